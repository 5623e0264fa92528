"""The table of samples every later stage reads: one row per image, with its labels and split.

Sources (folders, CSV files, file-name patterns) produce a `SampleTable`; validation, datasets,
training, evaluation and mining only ever read this table, never the source again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

TRAIN, VALID, TEST = "train", "valid", "test"
SPLITS = (TRAIN, VALID, TEST)


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: Absolute path of the image file.
        labels: Class names. Exactly one for single-label data; zero or more for multi-label
            data (an empty tuple is a valid negative for every class).
        split: One of "train", "valid", "test".
        group: Optional group id (site, patient, ...) that must not straddle splits.
    """

    path: Path
    labels: tuple[str, ...]
    split: str
    group: str | None = None

    @property
    def label(self) -> str:
        """The single label of a single-label sample."""
        if len(self.labels) != 1:
            raise ValueError(f"{self.path} has {len(self.labels)} labels, expected exactly one")
        return self.labels[0]


@dataclass
class SampleTable:
    """All samples of a data set plus what the source learned about them.

    Attributes:
        samples: The usable samples.
        classes: Sorted class names; the index of a name is its model output index.
        multi_label: True when an image may carry zero or several labels.
        root: The folder the data was read from (file names in reports are shown relative to it).
        notes: Human-readable remarks from the source and the checks, shown in the data summary.
        skipped: (path, reason) for every file that was found but cannot be used.
    """

    samples: list[Sample]
    classes: list[str]
    multi_label: bool = False
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split, in table order."""
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, Counter]:
        """Per split, how many samples carry each class (multi-label: each label counts once)."""
        out: dict[str, Counter] = {}
        for s in self.samples:
            c = out.setdefault(s.split, Counter())
            for lab in s.labels:
                c[lab] += 1
        return out

    def with_samples(self, samples: list[Sample]) -> "SampleTable":
        """A copy holding other samples but the same classes, task and notes."""
        return replace(self, samples=list(samples), notes=list(self.notes), skipped=list(self.skipped))

    def relpath(self, path: Path) -> str:
        """The path as shown to users: relative to the data root when inside it."""
        return relative_to_root(path, self.root)


def relative_to_root(path: str | Path, root: Path | None) -> str:
    """`path` relative to `root` when it lies inside it, else as given (as users see paths)."""
    if root is not None:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return str(path)
