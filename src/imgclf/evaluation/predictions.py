"""Validation predictions: the `Predictions` object everything in `imgclf.evaluation` starts from.

The probabilities a trained model gave the validation images, their targets and paths, with
the per-image quantities derived from them (predicted labels, losses, correctness) and the CSV
form (predictions.csv). Nothing here needs torch.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

# Probabilities are clipped to [EPS, 1 - EPS] before taking logs so a saturated softmax or
# sigmoid gives a large but finite loss.
EPS = 1e-12


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
# Helpers for the analyses


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
