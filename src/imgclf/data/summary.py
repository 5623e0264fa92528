"""The data set at a glance: per-class counts, imbalance and label statistics (data, no printing).

`summarize` turns a checked table (`imgclf.data.validate.check_table`) into a `DataSummary`,
which the run directory keeps as JSON and the command line draws as a table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from imgclf.data.samples import SPLITS, TRAIN, SampleTable
from imgclf.errors import display_path

IMBALANCE_FLAG = 3.0
IMBALANCED_NOTE = "(imbalanced: small classes may be learned poorly)"


@dataclass
class DataSummary:
    """The data set at a glance; saved as JSON in the run directory.

    Attributes:
        classes: Class names, in model output order.
        multi_label: True when an image may carry zero or several labels.
        images: Number of images per split.
        counts: Per split, images per class (multi-label: each label counts).
        imbalance_ratio: Largest over smallest training class; None without training images.
        imbalanced: The ratio is over 3: consider class weights or more images of small classes.
        empty_label_images: Multi-label: images without any label, per split.
        cooccurrence: Multi-label: [i][j] = images carrying classes i and j (diagonal: class i).
        groups: Number of distinct groups per split, when samples have groups.
        skipped: Files found but not used.
        notes: Remarks from the source and the checks.
        balance: What training does about imbalance ("none", "weights", "sampler"), once
            decided from the settings (see imgclf.training.balance); None before that.
        balance_note: That decision in words, shown under the imbalance ratio.
    """

    classes: list[str]
    multi_label: bool
    images: dict[str, int]
    counts: dict[str, dict[str, int]]
    imbalance_ratio: float | None
    imbalanced: bool
    empty_label_images: dict[str, int] = field(default_factory=dict)
    cooccurrence: list[list[int]] | None = None
    groups: dict[str, int] | None = None
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
    balance: str | None = None
    balance_note: str | None = None

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)

    def title(self) -> str:
        """The table's title, e.g. "Data: 3 classes, single-label"."""
        task = "multi-label" if self.multi_label else "single-label"
        return f"Data: {len(self.classes)} classes, {task}"

    def lines(self) -> list[str]:
        """What is said under the counts: imbalance, what training does about it, frequent
        label pairs, skipped files, then the notes of the source and the checks."""
        out = []
        if self.imbalance_ratio is not None:
            out.append(f"largest / smallest training class: {self.imbalance_ratio:g}"
                       + (f" {IMBALANCED_NOTE}" if self.imbalanced else ""))
        if self.balance_note and (self.imbalanced or self.balance not in (None, "none")):
            out.append(self.balance_note)
        pairs = top_pairs(self)
        if pairs:
            out.append("most frequent label pairs: " + ", ".join(f"{a}+{b} ({n})" for a, b, n in pairs))
        if self.skipped:
            out.append(f"{self.skipped} files skipped (listed in the run directory)")
        return out + [f"- {note}" for note in self.notes]

    def text(self) -> str:
        """The summary as plain text: title, images per split, then `lines()`."""
        per_split = ", ".join(f"{n} {s}" for s, n in self.images.items())
        return "\n".join([f"{self.title()}; images: {per_split}", *self.lines()])


def summarize(table: SampleTable, report=None) -> DataSummary:
    """Per-class counts, imbalance and label statistics of a (checked) table.

    Args:
        table: The table, normally as returned by `check_table`.
        report: The check's findings (`imgclf.data.validate.CheckReport`), added to the notes.
    """
    splits = [s for s in SPLITS if table.split(s)]
    counts = table.counts()
    per_split = {s: {c: counts.get(s, Counter())[c] for c in table.classes} for s in splits}
    train = [n for n in per_split.get(TRAIN, {}).values() if n > 0]
    ratio = max(train) / min(train) if train else None
    summary = DataSummary(
        classes=list(table.classes),
        multi_label=table.multi_label,
        images={s: len(table.split(s)) for s in splits},
        counts=per_split,
        imbalance_ratio=round(ratio, 2) if ratio is not None else None,
        imbalanced=ratio is not None and ratio > IMBALANCE_FLAG,
        skipped=len(table.skipped),
        notes=list(table.notes) + (report.lines() if report else []),
    )
    if table.multi_label:
        summary.empty_label_images = {s: sum(not x.labels for x in table.split(s)) for s in splits}
        summary.cooccurrence = _cooccurrence(table)
    if any(s.group is not None for s in table.samples):
        summary.groups = {s: len({x.group for x in table.split(s) if x.group is not None}) for s in splits}
    return summary


def _cooccurrence(table: SampleTable) -> list[list[int]]:
    index = {c: i for i, c in enumerate(table.classes)}
    matrix = [[0] * len(index) for _ in index]
    for s in table.samples:
        ids = [index[lab] for lab in s.labels if lab in index]
        for i in ids:
            for j in ids:
                matrix[i][j] += 1
    return matrix


def top_pairs(summary: DataSummary, limit: int = 5) -> list[tuple[str, str, int]]:
    """Multi-label: the label pairs most often on one image, as (a, b, images), most first."""
    m, names = summary.cooccurrence, summary.classes
    if not m:
        return []
    pairs = [(display_path(names[i]), display_path(names[j]), m[i][j])
             for i in range(len(names)) for j in range(i + 1, len(names)) if m[i][j]]
    return sorted(pairs, key=lambda p: -p[2])[:limit]
