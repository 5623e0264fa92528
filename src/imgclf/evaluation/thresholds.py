"""Multi-label decision thresholds: one global threshold or one per class, whichever holds up.

The search maximises a decision metric (exact-match accuracy, Hamming accuracy or macro F1) on
the validation predictions and keeps per-class thresholds only where a cross-fit says they
generalise (see `search_thresholds`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from imgclf.config import THRESHOLD_METRICS  # noqa: F401 (re-exported; declared with the option)
from imgclf.evaluation.scoring import (_macro_f1, f1_macro_multilabel, hamming_accuracy,
                                       zero_one_accuracy)

_METRIC_WORDS = {"zero_one": "exact-match accuracy", "hamming": "label accuracy", "f1_macro": "macro F1"}


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
