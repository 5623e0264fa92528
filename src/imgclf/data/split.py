"""Splits: train/valid (seeded, stratified, group-aware) and cross-validation folds.

`random_split` holds out a fraction of each class for validation; `assign_folds` and
`fold_table` deal the images into k folds for cross-validation (`imgclf cv`). Both keep every
group (`Sample.group`: site, patient, ...) on one side.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from imgclf.data.files import _compile, _rel
from imgclf.data.samples import TRAIN, VALID, Sample, SampleTable
from imgclf.errors import DataError, ImgclfError, display_path


def random_split(
    samples: list[Sample], valid_pct: float = 0.2, seed: int = 42, multi_label: bool = False
) -> list[Sample]:
    """Assign each sample to "train" or "valid": seeded, stratified per class and group-aware.

    Every group (`Sample.group`; samples without one are their own group) lands wholly in one
    split. Groups are assigned greedily, largest first, to whichever side brings each class's
    validation share closest to `valid_pct`, so single-label and multi-label data (each label
    counted) are stratified alike; then every class gets at least one validation and one training
    group. The result does not depend on the order of `samples`.

    Args:
        samples: The samples to split; their current split is ignored.
        valid_pct: Target fraction of each class in validation, between 0 and 1.
        seed: Seed of the shuffle that breaks ties between groups.
        multi_label: True when samples may carry zero or several labels; otherwise each must
            carry exactly one.

    Returns:
        The samples in the same order, with their split set.

    Raises:
        DataError: `valid_pct` is out of range, or a class has a single image or a single group.
    """
    if not 0 < valid_pct < 1:
        raise DataError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct}")
    if not samples:
        return []
    if not multi_label:
        odd = next((s for s in samples if len(s.labels) != 1), None)
        if odd is not None:
            raise DataError(f"{display_path(odd.path)}: has {len(odd.labels)} labels in a single-label data set")
    groups = _groups(samples)
    in_valid = _greedy_assign(groups, valid_pct, seed)
    _ensure_both_sides(groups, in_valid)
    return [replace(s, split=VALID if _group_key(s) in in_valid else TRAIN) for s in samples]


@dataclass
class _Group:
    key: str
    size: int
    counts: Counter  # label -> number of samples; "" counts samples without labels


def _group_key(s: Sample) -> str:
    # The NUL prefix keeps ungrouped files from colliding with a group of the same name.
    return f"g:{s.group}" if s.group is not None else f"\0{s.path}"


def _groups(samples: list[Sample]) -> list[_Group]:
    by_key: dict[str, _Group] = {}
    for s in samples:
        g = by_key.setdefault(_group_key(s), _Group(_group_key(s), 0, Counter()))
        g.size += 1
        g.counts.update(s.labels or ("",))
    return [by_key[k] for k in sorted(by_key)]


def _greedy_assign(groups: list[_Group], valid_pct: float, seed: int) -> set[str]:
    order = list(groups)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -g.size)  # stable: equal sizes keep the seeded order
    totals: Counter = Counter()
    for g in groups:
        totals.update(g.counts)
    target = {c: valid_pct * n for c, n in totals.items()}
    in_valid: Counter = Counter()
    chosen = set()
    for g in order:
        # Normalised by class size, so a rare class weighs as much as a common one.
        before = sum(abs(target[c] - in_valid[c]) / totals[c] for c in g.counts)
        after = sum(abs(target[c] - in_valid[c] - n) / totals[c] for c, n in g.counts.items())
        if after < before:
            chosen.add(g.key)
            in_valid.update(g.counts)
    return chosen


def _ensure_both_sides(groups: list[_Group], in_valid: set[str]) -> None:
    """Move the smallest group needed so every class has training and validation samples."""
    by_class: dict[str, list[_Group]] = defaultdict(list)
    for g in groups:
        for c in g.counts:
            if c:
                by_class[c].append(g)
    for c, members in sorted(by_class.items()):
        if len(members) < 2:
            raise DataError(_unsplittable_message(c, members[0]))
    for _ in range(3):  # a move can starve another class; a few passes settle it
        moved = False
        for c, members in sorted(by_class.items()):
            valid = [g for g in members if g.key in in_valid]
            train = [g for g in members if g.key not in in_valid]
            if not valid:
                in_valid.add(min(train, key=lambda g: (g.size, g.key)).key)
                moved = True
            elif not train:
                in_valid.discard(min(valid, key=lambda g: (g.size, g.key)).key)
                moved = True
        if not moved:
            return


def _unsplittable_message(label: str, group: _Group) -> str:
    n = group.counts[label]
    if n == 1 and not group.key.startswith("g:"):
        return (f"class '{label}' has 1 image; at least 2 are needed to split — "
                "add images or pass a split")
    return (f"class '{label}': all {n} images are in one group ('{group.key[2:]}'), which cannot be in "
            "both training and validation — add images from other groups or pass a split")


def _apply_groups(table: SampleTable, group_pattern: str | None) -> None:
    """Set each sample's group from the first group of `group_pattern` searched in its relative path."""
    if group_pattern is None:
        return
    rx = _compile(group_pattern, "group pattern")
    out, unmatched = [], 0
    for s in table.samples:
        m = rx.search(_rel(s.path, table.root).as_posix())
        unmatched += not (m and m.group(1))
        out.append(replace(s, group=m.group(1) if m and m.group(1) else None))
    if unmatched == len(table.samples) and table.samples:
        example = display_path(_rel(table.samples[0].path, table.root).as_posix())
        raise DataError(f"the group pattern '{group_pattern}' matches none of the "
                        f"{unmatched} files (e.g. {example}), so no group would be kept "
                        "together: fix --group-pattern (its first group is searched in the path "
                        "relative to the data folder)")
    if unmatched:
        table.notes.append(f"{unmatched} files do not match the group pattern {group_pattern!r}: "
                           "each is its own group")
    table.samples = out


# ---------------------------------------------------------------------------------------------
# Cross-validation folds


def assign_folds(samples: list[Sample], folds: int, seed: int = 42,
                 multi_label: bool = False) -> list[int]:
    """Deal samples into `folds` folds, stratified by class and keeping every group in one fold.

    scikit-learn's StratifiedGroupKFold does the dealing (shuffled with `seed`); samples
    without a group are groups of one. Multi-label samples are stratified by their rarest label.
    The result does not depend on the order of `samples`.

    Args:
        samples: The samples to deal.
        folds: Number of folds, at least 2.
        seed: Seed of the shuffle.
        multi_label: Whether samples may carry zero or several labels.

    Returns:
        The fold (0 .. folds - 1) of each sample, in the order of `samples`.

    Raises:
        DataError: Fewer than 2 folds, fewer groups than folds, or a class whose images are all
            in one group (some fold would have none of it to train on).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {folds}: pass --folds 2 or more")
    keys = [_group_key(s) for s in samples]
    n_groups = len(set(keys))
    if n_groups < folds:
        raise DataError(f"only {n_groups} groups (or images) for {folds} folds: pass fewer --folds")
    by_class: dict[str, set[str]] = {}
    for s, k in zip(samples, keys):
        for lab in s.labels:
            by_class.setdefault(lab, set()).add(k)
    for lab, groups in sorted(by_class.items()):
        if len(groups) < 2:
            what = "image" if not next(iter(groups)).startswith("g:") else "group"
            raise DataError(f"class '{lab}' has a single {what}: every fold needs it in training "
                            "and validation can hold it only once — add images (from other groups) "
                            "or remove the class")
    freq = Counter(lab for s in samples for lab in s.labels)
    strata = [min(s.labels, key=lambda lab: (freq[lab], lab)) if s.labels else "" for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (keys[i], str(samples[i].path)))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = [0] * len(samples)
    with warnings.catch_warnings():
        # Classes smaller than `folds` are fine: some folds validate on none of them.
        warnings.simplefilter("ignore", UserWarning)
        splits = splitter.split(np.zeros(len(order)), [strata[i] for i in order],
                                [keys[i] for i in order])
        for k, (_, held_out) in enumerate(splits):
            for j in held_out:
                out[order[j]] = k
    return out


def fold_table(table: SampleTable, folds: int, fold: int | None, seed: int = 42) -> SampleTable:
    """The table with its train and valid images re-split: fold `fold` validates, the rest train.

    Test images stay test images. The source's own split is ignored (cross-validation uses
    every labelled image); a note says so in the data summary.

    Raises:
        ImgclfError: `fold` is missing or out of range.
        DataError: As `assign_folds`.
    """
    if fold is None or not 0 <= fold < folds:
        raise ImgclfError(f"fold must be 0 .. {folds - 1} with folds={folds} (got {fold}): "
                          "run `imgclf cv`, which sets both")
    pool = [i for i, s in enumerate(table.samples) if s.split in (TRAIN, VALID)]
    assigned = assign_folds([table.samples[i] for i in pool], folds, seed, table.multi_label)
    samples = list(table.samples)
    for i, k in zip(pool, assigned):
        samples[i] = replace(samples[i], split=VALID if k == fold else TRAIN)
    out = table.with_samples(samples)
    out.notes.append(f"cross-validation: fold {fold} of {folds} validates "
                     f"({assigned.count(fold)} of {len(pool)} images; groups kept whole)")
    return out
