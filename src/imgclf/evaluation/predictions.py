"""From validation predictions to numbers, decision thresholds and error analysis.

Everything here starts from a `Predictions` object (the probabilities a trained model gave the
validation images, their targets and paths) and is a pure function of it: metrics, multi-label
threshold search, confusion matrices, most-confused pairs, top losses, PR/ROC curves,
calibration and suspected label errors. Nothing here needs torch.

Undefined numbers (the AP of a class with no positive example, ...) are None in metric dicts so
that they serialise to strict JSON, and NaN in curve and calibration data meant for plots.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

# sklearn.metrics is imported inside the functions that use it: importing it costs about a
# second, which every CLI command would otherwise pay even when it evaluates nothing.

# Probabilities are clipped to [EPS, 1 - EPS] before taking logs so a saturated softmax or
# sigmoid gives a large but finite loss.
EPS = 1e-12
THRESHOLD_METRICS = ("zero_one", "hamming", "f1_macro")
_METRIC_WORDS = {"zero_one": "exact-match accuracy", "hamming": "label accuracy", "f1_macro": "macro F1"}


@dataclass
class Predictions:
    """A model's probabilities on a labelled image set (usually the validation split).

    Attributes:
        paths: Image paths as shown to users.
        classes: Class names; column `j` of `probs` belongs to `classes[j]`.
        probs: [N, C] softmax (single-label) or sigmoid (multi-label) outputs.
        targets: Single-label: class index per image [N]. Multi-label: 0/1 indicator [N, C].
        multi_label: True when an image may carry zero or several labels.
        thresholds: Multi-label decision thresholds [C]; None means 0.5 for every class.
    """

    paths: list[str]
    classes: list[str]
    probs: np.ndarray
    targets: np.ndarray
    multi_label: bool = False
    thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths = [str(x) for x in self.paths]
        self.classes = [str(c) for c in self.classes]
        probs = np.asarray(self.probs)
        if not np.issubdtype(probs.dtype, np.floating):
            probs = probs.astype(np.float64)
        n, c = len(self.paths), len(self.classes)
        if probs.ndim != 2 or probs.shape != (n, c):
            raise ValueError(f"probs has shape {probs.shape}, expected ({n}, {c}) for {n} paths and {c} classes")
        if len(set(self.classes)) != c:
            raise ValueError("class names must be unique")
        targets = np.asarray(self.targets)
        if self.multi_label:
            if targets.shape != (n, c):
                raise ValueError(f"multi-label targets have shape {targets.shape}, expected ({n}, {c})")
            if targets.size and not np.isin(targets, (0, 1)).all():
                raise ValueError("multi-label targets must be 0 or 1")
            targets = targets.astype(np.int8)
        else:
            if targets.shape != (n,):
                raise ValueError(f"single-label targets have shape {targets.shape}, expected ({n},)")
            in_range = targets.size == 0 or (targets.min() >= 0 and targets.max() < c)
            if targets.size and (not np.issubdtype(targets.dtype, np.integer) or not in_range):
                raise ValueError(f"single-label targets must be class indices in [0, {c})")
            targets = targets.astype(np.int64)
        if self.thresholds is not None:
            thresholds = np.broadcast_to(np.asarray(self.thresholds, dtype=np.float64), (c,)).copy()
            self.thresholds = thresholds
        self.probs, self.targets = probs, targets

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def decision_thresholds(self) -> np.ndarray:
        """Multi-label thresholds [C] actually applied (0.5 where none were set)."""
        if self.thresholds is None:
            return np.full(self.n_classes, 0.5)
        return self.thresholds

    @property
    def predicted(self) -> np.ndarray:
        """Single-label: argmax class index [N]. Multi-label: bool [N, C], probs >= thresholds."""
        if self.multi_label:
            return self.probs >= self.decision_thresholds
        return self.probs.argmax(axis=1)

    @property
    def losses(self) -> np.ndarray:
        """Per-image loss [N]: cross-entropy, or for multi-label the BCE averaged over classes."""
        p = np.clip(self.probs.astype(np.float64), EPS, 1 - EPS)
        if self.multi_label:
            y = self.targets
            return -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(axis=1)
        return -np.log(p[np.arange(len(p)), self.targets])

    @property
    def correct(self) -> np.ndarray:
        """Bool [N]: prediction right (multi-label: every class decided right)."""
        if self.multi_label:
            return (self.predicted == self.targets.astype(bool)).all(axis=1)
        return self.predicted == self.targets

    def to_rows(self) -> list[dict[str, object]]:
        """One dict per image in the predictions.csv layout, with python values.

        Keys: path, target, predicted, prob_<class> for each class, loss. Multi-label target and
        predicted are the label sets joined by spaces.
        """
        probs, columns = self.probs.tolist(), self._prob_columns()
        return [
            {"path": path, "target": target, "predicted": pred, **dict(zip(columns, row)), "loss": loss}
            for path, target, pred, row, loss in zip(
                self.paths,
                self._label_cells(self.targets),
                self._label_cells(self.predicted),
                probs,
                self.losses.tolist(),
            )
        ]

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write predictions.csv atomically (a reader never sees a half-written file).

        Probabilities are written with the shortest text that reads back to the same value in
        their own dtype, so float32 outputs stay short and round-trip exactly.

        Raises:
            ValueError: For multi-label data whose class names contain whitespace, which the
                space-joined label sets could not represent.
        """
        if self.multi_label and any(not c or any(ch.isspace() for ch in c) for c in self.classes):
            raise ValueError("multi-label class names must be non-empty and contain no whitespace for predictions.csv")
        path = os.fspath(path)
        tmp = path + ".tmp"
        header = ["path", "target", "predicted", *self._prob_columns(), "loss"]
        losses = self.losses
        # surrogateescape: a file name that is not valid UTF-8 is written back as its raw bytes.
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i, (target, pred) in enumerate(zip(self._label_cells(self.targets), self._label_cells(self.predicted))):
                # str() of a numpy scalar is its shortest round-trip text in its own precision
                writer.writerow([self.paths[i], target, pred, *(str(v) for v in self.probs[i]), f"{losses[i]:.6g}"])
        os.replace(tmp, path)

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike, multi_label: bool | None = None, thresholds: np.ndarray | None = None
    ) -> "Predictions":
        """Read predictions.csv back.

        The predicted and loss columns are not read: they follow from the probabilities (and
        thresholds), which keeps a hand-edited file from contradicting itself.

        Args:
            path: The CSV file.
            multi_label: The task. None infers it: single-label when every target and predicted
                cell is exactly one class name and every row of probabilities sums to 1;
                otherwise multi-label. Pass it explicitly when the task is known (model.json).
            thresholds: Multi-label decision thresholds; they are not stored in the file.
        """
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = list(reader)
        prob_cols = [i for i, h in enumerate(header) if h.startswith("prob_")]
        classes = [header[i][len("prob_"):] for i in prob_cols]
        col = {h: i for i, h in enumerate(header)}
        for needed in ("path", "target"):
            if needed not in col:
                raise ValueError(f"{path}: no '{needed}' column")
        probs = np.array([[float(r[i]) for i in prob_cols] for r in rows], dtype=np.float64)
        probs = probs.reshape(len(rows), len(classes))
        target_cells = [r[col["target"]] for r in rows]
        if multi_label is None:
            names = set(classes)
            cells = target_cells + ([r[col["predicted"]] for r in rows] if "predicted" in col else [])
            one_name_each = all(cell in names for cell in cells)
            sums_to_one = bool(np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)) if len(rows) else True
            multi_label = not (one_name_each and sums_to_one)
        index = {c: j for j, c in enumerate(classes)}
        try:
            if multi_label:
                targets = np.zeros((len(rows), len(classes)), dtype=np.int8)
                for i, cell in enumerate(target_cells):
                    for name in cell.split():
                        targets[i, index[name]] = 1
            else:
                targets = np.array([index[cell] for cell in target_cells], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"{path}: target {e} is not one of the prob_<class> columns") from None
        return cls(
            paths=[r[col["path"]] for r in rows],
            classes=classes,
            probs=probs,
            targets=targets,
            multi_label=multi_label,
            thresholds=thresholds,
        )

    def _prob_columns(self) -> list[str]:
        return [f"prob_{c}" for c in self.classes]

    def _label_cells(self, labels: np.ndarray) -> list[str]:
        if self.multi_label:
            names = np.array(self.classes, dtype=object)
            return [" ".join(names[row.astype(bool)]) for row in labels]
        return [self.classes[j] for j in labels]


# ---------------------------------------------------------------------------------------------
# Metrics


def hamming_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of (image, class) decisions that are right; 1 - Hamming loss.

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return float((y_true == y_pred).mean())


def zero_one_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of images whose whole label set is predicted exactly (subset accuracy).

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return float((y_true == y_pred).all(axis=1).mean())


def f1_macro_multilabel(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes that occur in the targets or the decisions.

    A class that is neither present nor predicted has nothing to get right, so it is left out
    rather than counted as 0; this is what scikit-learn's macro F1 does for single-label data.

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = (y_true & y_pred).sum(axis=0)
    fp = (~y_true & y_pred).sum(axis=0)
    fn = (y_true & ~y_pred).sum(axis=0)
    return _macro_f1(tp, fp, fn)


def _macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float | np.ndarray:
    """Macro F1 from per-class counts; counts may carry leading axes (e.g. [G, C])."""
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(np.shape(denom)), where=present)
    n_present = present.sum(axis=-1)
    out = np.divide(f1.sum(axis=-1), n_present, out=np.zeros(np.shape(n_present)), where=n_present > 0)
    return float(out) if np.ndim(out) == 0 else out


def single_label_metrics(p: Predictions) -> dict:
    """Headline and per-class numbers of a single-label classifier.

    Returns:
        accuracy, balanced_accuracy (mean recall over classes with validation examples),
        f1_macro (over classes present in targets or predictions, as scikit-learn does),
        loss (mean cross-entropy), top5_accuracy (only when there are more than 5 classes),
        n_samples, and per_class {class: {precision, recall, f1, support}}.
    """
    from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

    _require_single(p, "single_label_metrics")
    _require_samples(p)
    labels = np.arange(p.n_classes)
    y, pred = p.targets, p.predicted
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    n_pred = np.bincount(pred, minlength=p.n_classes)
    present = (support > 0) | (n_pred > 0)
    out: dict = {
        "accuracy": float((y == pred).mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "f1_macro": float(f1[present].mean()),
        "loss": float(p.losses.mean()),
    }
    if p.n_classes > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(y, p.probs, k=5, labels=labels))
    out["n_samples"] = len(y)
    out["per_class"] = {
        c: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
        }
        for j, c in enumerate(p.classes)
    }
    return out


def multi_label_metrics(p: Predictions, thresholds: float | np.ndarray | None = None) -> dict:
    """Headline and per-class numbers of a multi-label classifier.

    Args:
        p: Multi-label predictions.
        thresholds: Decision thresholds (scalar or [C]); default `p.thresholds`, else 0.5.

    Returns:
        hamming_accuracy (label level), zero_one_accuracy (exact match), f1_micro, f1_macro
        (over classes present in targets or decisions), map (mean average precision over the
        classes that have positives; None if none has), loss (mean BCE), thresholds, n_samples,
        and per_class {class: {precision, recall, f1, ap, support}} (ap None without positives).
    """
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    _require_multi(p, "multi_label_metrics")
    _require_samples(p)
    if thresholds is None:
        thr = p.decision_thresholds
    else:
        thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (p.n_classes,))
    y = p.targets.astype(bool)
    pred = p.probs >= thr
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    ap = [float(average_precision_score(y[:, j], p.probs[:, j])) if support[j] else None for j in range(p.n_classes)]
    defined = [a for a in ap if a is not None]
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "hamming_accuracy": hamming_accuracy(y, pred),
        "zero_one_accuracy": zero_one_accuracy(y, pred),
        "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
        "f1_macro": _macro_f1(tp, fp, fn),
        "map": float(np.mean(defined)) if defined else None,
        "loss": float(p.losses.mean()),
        "thresholds": [float(t) for t in thr],
        "n_samples": len(y),
        "per_class": {
            c: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "ap": ap[j],
                "support": int(support[j]),
            }
            for j, c in enumerate(p.classes)
        },
    }


def metrics(p: Predictions) -> dict:
    """`multi_label_metrics` or `single_label_metrics`, whichever fits the task."""
    return multi_label_metrics(p) if p.multi_label else single_label_metrics(p)


# ---------------------------------------------------------------------------------------------
# Multi-label threshold search


@dataclass
class ThresholdSearch:
    """The outcome of a multi-label threshold search (all plain python values, JSON-ready).

    Attributes:
        metric: The metric maximised: "zero_one", "hamming" or "f1_macro".
        grid: Candidate thresholds, ascending.
        global_threshold: The best single threshold for all classes.
        global_score: The metric at `global_threshold` on the whole validation set.
        global_curve: The metric at every grid threshold.
        per_class_thresholds: The best threshold of each class.
        per_class_score: The metric with `per_class_thresholds` on the whole validation set
            (optimistic: chosen and scored on the same images).
        per_class_curves: Per class, the metric's per-class analogue at every grid threshold:
            the class's accuracy (hamming), its F1 (f1_macro), or the exact-match accuracy with
            the other classes held at their chosen thresholds (zero_one).
        heldout_global: Cross-fitted score of a global threshold (None when not evaluated).
        heldout_per_class: Cross-fitted score of per-class thresholds (None when not evaluated).
        kept: "global" or "per_class".
        reason: Why, in a sentence for the report.
    """

    metric: str
    grid: list[float]
    global_threshold: float
    global_score: float
    global_curve: list[float]
    per_class_thresholds: list[float]
    per_class_score: float
    per_class_curves: list[list[float]]
    heldout_global: float | None
    heldout_per_class: float | None
    kept: str
    reason: str

    @property
    def thresholds(self) -> np.ndarray:
        """The thresholds that were kept, one per class [C]."""
        if self.kept == "per_class":
            return np.asarray(self.per_class_thresholds, dtype=np.float64)
        return np.full(len(self.per_class_thresholds), self.global_threshold)

    def to_dict(self) -> dict:
        """Plain dict for JSON, including the kept `thresholds`."""
        return {**asdict(self), "thresholds": self.thresholds.tolist()}


def search_thresholds(
    probs: np.ndarray,
    targets: np.ndarray,
    metric: str = "zero_one",
    grid: np.ndarray | None = None,
    min_positives: int = 10,
    margin: float = 0.01,
    n_folds: int = 2,
    n_repeats: int = 5,
    seed: int = 0,
    classes: list[str] | None = None,
) -> ThresholdSearch:
    """Choose multi-label decision thresholds (predict class j when probs[:, j] >= t_j).

    Two candidates are fitted on the validation set: one global threshold, the grid point that
    maximises `metric`; and per-class thresholds. For "hamming" and "f1_macro" the metric
    decomposes over classes, so each class takes the threshold that maximises its own accuracy
    or F1. Exact match ("zero_one") does not decompose; it is improved by coordinate ascent
    (one class at a time, the others fixed; a move must strictly improve), started both from the
    global threshold and from each class's accuracy-optimal threshold, keeping the better end.

    Ties: among grid points that reach the best score, take the widest run of consecutive
    points (plateau), then its middle, preferring the point nearer 0.5; a threshold in the middle
    of a plateau moves least when the data shift.

    Per-class thresholds fit noise on small validation sets, so they are kept only when both:
      1. every class has at least `min_positives` positive and `min_positives` negative
         validation examples, and
      2. on held-out data they beat the global threshold by more than `margin`: the validation
         set is split at random into `n_folds` folds (`n_repeats` times); both candidates are
         fitted on the other folds and decide each held-out fold; the metric of these
         out-of-fold decisions, averaged over repeats, is compared.
    Otherwise the global threshold is kept.

    Args:
        probs: Sigmoid outputs [N, C].
        targets: 0/1 indicator [N, C].
        metric: "zero_one" (exact match), "hamming" (label accuracy) or "f1_macro".
        grid: Candidate thresholds; default 0.05, 0.06, ..., 0.95.
        min_positives: Fewest positive (and negative) examples per class for per-class thresholds.
        margin: How much higher the held-out score of per-class thresholds must be.
        n_folds: Folds of the cross-fitting.
        n_repeats: Random fold assignments averaged.
        seed: Seed of the fold assignments.
        classes: Class names, only for the reason sentence.

    Returns:
        What was chosen, with the curves behind it.
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"metric must be one of {THRESHOLD_METRICS}, got {metric!r}")
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be [N, C]")
    if len(probs) == 0:
        raise ValueError("no validation examples to choose thresholds on")
    # rounding keeps linspace artefacts (0.5000000000000001) from flipping decisions at p == t
    grid = np.unique(np.round(np.linspace(0.05, 0.95, 91) if grid is None else np.asarray(grid, float), 10))
    n, c = probs.shape
    names = classes if classes is not None else [str(j) for j in range(c)]

    g, global_curve, pc, pc_curves = _fit_thresholds(probs, targets, grid, metric)
    global_t = float(grid[g])
    pc_t = grid[pc]
    pc_score = _decision_score(metric, targets, probs >= pc_t)

    pos = targets.sum(axis=0)
    neg = n - pos
    scarce = [(j, "positive", int(pos[j])) for j in range(c) if pos[j] < min_positives]
    scarce += [(j, "negative", int(neg[j])) for j in range(c) if neg[j] < min_positives]
    heldout_g = heldout_pc = None
    if scarce:
        j, kind, count = min(scarce, key=lambda s: (s[2], s[0]))
        more = f"; {len(scarce) - 1} other counts fall short too" if len(scarce) > 1 else ""
        kept = "global"
        reason = (
            f"Kept the global threshold {global_t:.2f}: per-class thresholds need at least {min_positives} "
            f"positive and {min_positives} negative validation examples in every class, and class "
            f"'{names[j]}' has only {count} {kind} example{'' if count == 1 else 's'}{more}."
        )
    else:
        heldout_g, heldout_pc = _cross_fit(probs, targets, grid, metric, n_folds, n_repeats, seed)
        how = f"on held-out folds ({n_folds}-fold cross-fitting, {n_repeats} repeats)"
        words = _METRIC_WORDS[metric]
        if heldout_pc - heldout_g > margin:
            kept = "per_class"
            reason = (
                f"Kept per-class thresholds: {how} they scored {words} {heldout_pc:.3f} against "
                f"{heldout_g:.3f} for a global threshold, more than the required margin of {margin:g}."
            )
        else:
            kept = "global"
            reason = (
                f"Kept the global threshold {global_t:.2f}: {how} per-class thresholds scored "
                f"{words} {heldout_pc:.3f} against {heldout_g:.3f} for a global threshold, "
                f"not better by the required margin of {margin:g}."
            )
    return ThresholdSearch(
        metric=metric,
        grid=grid.tolist(),
        global_threshold=global_t,
        global_score=float(global_curve[g]),
        global_curve=global_curve.tolist(),
        per_class_thresholds=pc_t.tolist(),
        per_class_score=pc_score,
        per_class_curves=pc_curves.tolist(),
        heldout_global=heldout_g,
        heldout_per_class=heldout_pc,
        kept=kept,
        reason=reason,
    )


def _decision_score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if metric == "zero_one":
        return zero_one_accuracy(y_true, y_pred)
    if metric == "hamming":
        return hamming_accuracy(y_true, y_pred)
    return f1_macro_multilabel(y_true, y_pred)


def _pick(scores: np.ndarray, grid: np.ndarray) -> int:
    """Index of the best score; ties go to the middle of the widest plateau, then nearest 0.5."""
    at_best = np.flatnonzero(np.isclose(scores, scores.max(), rtol=0, atol=1e-12))
    runs = np.split(at_best, np.flatnonzero(np.diff(at_best) > 1) + 1)
    run = min(runs, key=lambda r: (-len(r), abs((grid[r[0]] + grid[r[-1]]) / 2 - 0.5)))
    middle = run[(len(run) - 1) // 2 : len(run) // 2 + 1]
    return int(min(middle, key=lambda i: abs(grid[i] - 0.5)))


def _fit_thresholds(
    probs: np.ndarray, targets: np.ndarray, grid: np.ndarray, metric: str
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Fit both candidates on one set of examples.

    Returns:
        Global grid index, global curve [G], per-class grid indices [C], per-class curves [C, G].
    """
    n, c = probs.shape
    # Sorting each class's probabilities once turns "how many examples fall on each side of
    # every grid threshold" into cumulative sums read at searchsorted positions: O(N log N + G)
    # per class instead of O(N * G).
    order = np.argsort(probs, axis=0, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=0)
    below = np.stack([np.searchsorted(sorted_p[:, j], grid, side="left") for j in range(c)], axis=1)  # [G, C]: # p < t
    y_sorted = np.take_along_axis(targets, order, axis=0).astype(np.int64)
    cum_pos = np.vstack([np.zeros((1, c), np.int64), np.cumsum(y_sorted, axis=0)])
    pos_below = np.take_along_axis(cum_pos, below, axis=0)
    n_pos = cum_pos[-1]
    tp = n_pos - pos_below  # positives with p >= t
    tn = below - pos_below  # negatives with p < t
    fp = (n - n_pos) - tn
    fn = n_pos - tp
    class_acc = (tp + tn) / n  # [G, C]

    if metric == "hamming":
        global_curve = class_acc.mean(axis=1)
        pc_curves = class_acc.T
        pc = np.array([_pick(curve, grid) for curve in pc_curves])
        return _pick(global_curve, grid), global_curve, pc, pc_curves
    if metric == "f1_macro":
        global_curve = _macro_f1(tp, fp, fn)
        denom = 2 * tp + fp + fn
        pc_curves = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0).T
        pc = np.array([_pick(curve, grid) for curve in pc_curves])
        return _pick(global_curve, grid), global_curve, pc, pc_curves

    # Exact match at one threshold t: an image is right iff t > its highest negative probability
    # (lo) and t <= its lowest positive probability (hi).
    lo = np.where(targets, -np.inf, probs).max(axis=1)
    hi = np.where(targets, probs, np.inf).min(axis=1)
    ok = lo < hi
    global_curve = (
        np.searchsorted(np.sort(lo[ok]), grid, side="left") - np.searchsorted(np.sort(hi[ok]), grid, side="left")
    ) / n
    g = _pick(global_curve, grid)

    def ascend(start: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        idx = start.copy()
        right = (probs >= grid[idx]) == targets
        n_wrong = (~right).sum(axis=1)
        curves = np.zeros((c, len(grid)))

        def curve(j: int) -> np.ndarray:
            # exact-match accuracy as t_j varies: only images right on every other class count
            others_right = (n_wrong - ~right[:, j]) == 0
            w = others_right[order[:, j]].astype(np.int64)
            cum_w_pos = np.concatenate([[0], np.cumsum(w * y_sorted[:, j])])
            cum_w = np.concatenate([[0], np.cumsum(w)])
            b = below[:, j]
            return (cum_w_pos[-1] - cum_w_pos[b] + (cum_w[b] - cum_w_pos[b])) / n

        for _ in range(50):  # each accepted move strictly raises the score, so this converges
            moved = False
            for j in range(c):
                curves[j] = curve(j)
                best = _pick(curves[j], grid)
                if curves[j][best] > curves[j][idx[j]] + 1e-12:
                    idx[j] = best
                    new_right = (probs[:, j] >= grid[best]) == targets[:, j]
                    n_wrong += (~new_right).astype(np.int64) - (~right[:, j])
                    right[:, j] = new_right
                    moved = True
            if not moved:
                break
        # curves drawn during a sweep with moves may predate later moves; redraw at the end
        curves = np.stack([curve(j) for j in range(c)]) if c else curves
        return idx, curves, float((n_wrong == 0).mean())

    results = [ascend(np.full(c, g)), ascend(np.array([_pick(curve, grid) for curve in class_acc.T]))]
    pc, pc_curves, _ = max(results, key=lambda r: r[2])  # max keeps the first (global start) on ties
    return g, global_curve, pc, pc_curves


def _cross_fit(
    probs: np.ndarray, targets: np.ndarray, grid: np.ndarray, metric: str, n_folds: int, n_repeats: int, seed: int
) -> tuple[float, float]:
    """Held-out scores (global, per-class): thresholds fitted on other folds decide each fold."""
    rng = np.random.default_rng(seed)
    n = len(probs)
    scores_g, scores_pc = [], []
    for _ in range(n_repeats):
        folds = np.array_split(rng.permutation(n), n_folds)
        out_g = np.zeros(targets.shape, bool)
        out_pc = np.zeros(targets.shape, bool)
        for k, test in enumerate(folds):
            train = np.concatenate([f for i, f in enumerate(folds) if i != k])
            g, _, pc, _ = _fit_thresholds(probs[train], targets[train], grid, metric)
            out_g[test] = probs[test] >= grid[g]
            out_pc[test] = probs[test] >= grid[pc]
        scores_g.append(_decision_score(metric, targets, out_g))
        scores_pc.append(_decision_score(metric, targets, out_pc))
    return float(np.mean(scores_g)), float(np.mean(scores_pc))


# ---------------------------------------------------------------------------------------------
# Error analysis


def confusion(p: Predictions) -> np.ndarray:
    """Single-label confusion matrix [C, C] of counts; rows are actual, columns predicted."""
    _require_single(p, "confusion (use multilabel_confusion)")
    c = p.n_classes
    return np.bincount(p.targets * c + p.predicted, minlength=c * c).reshape(c, c)


def confusion_normalized(p: Predictions) -> np.ndarray:
    """Row-normalised confusion matrix: row i is where images of class i went; empty rows stay 0."""
    cm = confusion(p).astype(np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def multilabel_confusion(p: Predictions) -> np.ndarray:
    """Per-class 2x2 matrices [C, 2, 2]: [[tn, fp], [fn, tp]] (scikit-learn's layout)."""
    from sklearn.metrics import multilabel_confusion_matrix

    _require_multi(p, "multilabel_confusion")
    return multilabel_confusion_matrix(p.targets, p.predicted.astype(np.int8), labels=np.arange(p.n_classes))


def _pair_counts(p: Predictions) -> np.ndarray:
    """[C, C] counts of (actual, predicted) mix-ups, diagonal zero."""
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        missed, spurious = (y & ~pred).astype(np.int64), (~y & pred).astype(np.int64)
        return missed.T @ spurious
    cm = confusion(p)
    np.fill_diagonal(cm, 0)
    return cm


def most_confused(p: Predictions, min_count: int = 1) -> list[tuple[str, str, int]]:
    """Class pairs the model mixes up, most frequent first (ties by actual, then predicted name).

    Single-label: (actual, predicted, count) from the off-diagonal confusion matrix.
    Multi-label: count of images where `actual` was missed while `predicted` was wrongly added.

    Args:
        p: Predictions.
        min_count: Leave out pairs with fewer images.
    """
    counts = _pair_counts(p)
    pairs = [
        (p.classes[a], p.classes[b], int(counts[a, b]))
        for a, b in zip(*np.nonzero(counts >= max(min_count, 1)))
    ]
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))


def top_losses(p: Predictions, k: int | None = None) -> list[int]:
    """Indices of the `k` highest-loss images (all when None), highest first; ties keep order."""
    order = np.argsort(-p.losses, kind="stable")
    return order[:k].tolist()


def confused(p: Predictions, actual: str | int, predicted: str | int, k: int | None = None) -> list[int]:
    """Images of class `actual` the model got wrong, most `predicted`-looking first.

    "The cats with the highest deer probability": among images whose target is `actual` and
    whose prediction is not `actual` (multi-label: labelled `actual` but `actual` missed, and not
    labelled `predicted`), sorted by probs[:, predicted] descending; ties keep image order.

    Args:
        p: Predictions.
        actual: Class name or index of the true class.
        predicted: Class name or index whose probability ranks the images.
        k: How many to return (all when None).
    """
    a, b = _class_index(p, actual), _class_index(p, predicted)
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        mask = y[:, a] & ~pred[:, a] & ~y[:, b]
    else:
        mask = (p.targets == a) & (p.predicted != a)
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(-p.probs[idx, b], kind="stable")]
    return idx[:k].tolist()


def most_confident_wrong(p: Predictions, k_per_class: int = 5) -> dict[str, list[int]]:
    """Per class, the wrong images the model was most sure about, most confident first.

    Single-label: keyed by the actual class; images of that class predicted as another class,
    ranked by the probability of the (wrong) predicted class. Multi-label: per class, the images
    whose decision for that class is wrong, ranked by the probability given to the wrong answer
    (p for a false positive, 1 - p for a false negative). Every class has a key.

    Args:
        p: Predictions.
        k_per_class: How many images per class.
    """
    out: dict[str, list[int]] = {}
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        wrong_conf = np.where(pred, p.probs, 1 - p.probs)
        for j, c in enumerate(p.classes):
            idx = np.flatnonzero(y[:, j] != pred[:, j])
            out[c] = idx[np.argsort(-wrong_conf[idx, j], kind="stable")][:k_per_class].tolist()
        return out
    pred = p.predicted
    conf = p.probs[np.arange(len(pred)), pred]
    for j, c in enumerate(p.classes):
        idx = np.flatnonzero((p.targets == j) & (pred != j))
        out[c] = idx[np.argsort(-conf[idx], kind="stable")][:k_per_class].tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Curves and calibration


def _one_vs_rest(p: Predictions, j: int) -> np.ndarray:
    return p.targets[:, j].astype(bool) if p.multi_label else p.targets == j


def pr_curves(p: Predictions) -> dict[str, dict]:
    """One-vs-rest precision-recall curve of every class (scikit-learn's).

    Returns:
        {class: {precision, recall, thresholds, ap}} with lists of floats. A class without
        positive examples has empty lists and ap NaN.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    out = {}
    for j, c in enumerate(p.classes):
        y = _one_vs_rest(p, j)
        if not y.any():
            out[c] = {"precision": [], "recall": [], "thresholds": [], "ap": math.nan}
            continue
        precision, recall, thr = precision_recall_curve(y, p.probs[:, j])
        out[c] = {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "thresholds": thr.tolist(),
            "ap": float(average_precision_score(y, p.probs[:, j])),
        }
    return out


def roc_curves(p: Predictions) -> dict[str, dict]:
    """One-vs-rest ROC curve of every class (scikit-learn's).

    Returns:
        {class: {fpr, tpr, auc}} with lists of floats. A class without positive or without
        negative examples has empty lists and auc NaN.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    out = {}
    for j, c in enumerate(p.classes):
        y = _one_vs_rest(p, j)
        if y.all() or not y.any():
            out[c] = {"fpr": [], "tpr": [], "auc": math.nan}
            continue
        fpr, tpr, _ = roc_curve(y, p.probs[:, j])
        out[c] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(roc_auc_score(y, p.probs[:, j]))}
    return out


def calibration(p: Predictions, n_bins: int = 15) -> dict:
    """Reliability diagram data and expected calibration error (ECE).

    Single-label: each image's top probability against whether the prediction was right.
    Multi-label: every (image, class) probability against that label being present.
    Bins are equal-width over [0, 1] and closed on the right, (lo, hi], the first also taking 0.
    ECE = sum over bins of (count / total) * |accuracy - confidence|.

    Returns:
        bin_edges [n_bins + 1], accuracy and confidence per bin (NaN where a bin is empty),
        counts per bin, and ece.
    """
    if p.multi_label:
        conf = p.probs.ravel().astype(np.float64)
        hit = p.targets.ravel().astype(np.float64)
    else:
        conf = p.probs.max(axis=1).astype(np.float64)
        hit = p.correct.astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=hit, minlength=n_bins) / counts
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
    filled = counts > 0
    gaps = np.abs(acc[filled] - mean_conf[filled])
    ece = float((counts[filled] / counts.sum() * gaps).sum()) if filled.any() else 0.0
    return {
        "bin_edges": edges.tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "counts": counts.tolist(),
        "ece": ece,
    }


# ---------------------------------------------------------------------------------------------
# Label issues


def label_issues(probs: np.ndarray, targets: np.ndarray, classes: list[str]) -> list[dict]:
    """Rank images whose given label looks wrong, confident-learning style.

    Each class j gets a threshold t_j: the mean probability of j over the images labelled j (how
    sure the model typically is when j is right). An image labelled y is suspect when some other
    class j has probs[j] >= t_j and probs[j] > probs[y]; the suggested label is the most probable
    such class and the score is the margin probs[suggested] - probs[y]. A class nobody is labelled
    with has no threshold and is never suggested. Use out-of-sample probabilities (validation, or
    cross-validated), or the model will have memorised the wrong labels.

    Args:
        probs: Softmax outputs [N, C].
        targets: Given class index per image [N] (single-label only).
        classes: Class names.

    Returns:
        Rows {index, given, suggested, score, given_prob, suggested_prob}, highest score first
        (ties by index).
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError("label_issues handles single-label targets [N] only")
    targets = targets.astype(np.int64)
    n, c = probs.shape
    counts = np.bincount(targets, minlength=c)
    sums = np.bincount(targets, weights=probs[np.arange(n), targets], minlength=c)
    thresholds = np.divide(sums, counts, out=np.full(c, np.inf), where=counts > 0)
    given = probs[np.arange(n), targets]
    candidate = (probs >= thresholds) & (probs > given[:, None])
    candidate[np.arange(n), targets] = False
    masked = np.where(candidate, probs, -np.inf)
    suggested = masked.argmax(axis=1)
    rows = [
        {
            "index": int(i),
            "given": classes[targets[i]],
            "suggested": classes[suggested[i]],
            "score": float(probs[i, suggested[i]] - given[i]),
            "given_prob": float(given[i]),
            "suggested_prob": float(probs[i, suggested[i]]),
        }
        for i in np.flatnonzero(candidate.any(axis=1))
    ]
    return sorted(rows, key=lambda r: (-r["score"], r["index"]))


# ---------------------------------------------------------------------------------------------
# Helpers


def _class_index(p: Predictions, name: str | int) -> int:
    if isinstance(name, (int, np.integer)):
        if not 0 <= name < p.n_classes:
            raise ValueError(f"class index {name} out of range [0, {p.n_classes})")
        return int(name)
    try:
        return p.classes.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; classes are {p.classes}") from None


def _require_single(p: Predictions, what: str) -> None:
    if p.multi_label:
        raise ValueError(f"{what} is for single-label predictions")


def _require_multi(p: Predictions, what: str) -> None:
    if not p.multi_label:
        raise ValueError(f"{what} is for multi-label predictions")


def _require_samples(p: Predictions) -> None:
    if len(p.paths) == 0:
        raise ValueError("no predictions to evaluate")
