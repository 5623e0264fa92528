"""Data sources: class folders, a CSV of labels, or labels in file names, each read into a SampleTable.

Sources only look at names and folders; whether a file decodes is checked later (`validate.py`).
Files that cannot be used are listed in `SampleTable.skipped` with the reason, never silently lost,
except hidden files (.DS_Store, .ipynb_checkpoints, ...), which no one means as data.

Folders and file-name patterns are read here, CSV files in `csv_source.py`; the directory walker
is `files.py`, the train/valid split and cross-validation folds `split.py`. `load_table` reads
the source a `TrainConfig` names.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter, defaultdict
from pathlib import Path

from imgclf.config import TrainConfig
from imgclf.data.corrections import apply_file as apply_corrections_file
from imgclf.data.csv_source import from_csv
from imgclf.data.files import (_compile, _dir_key, _entry_kind, _existing_folder, _list_dir, _rel,
                               _subdirs, _walk)
from imgclf.data.samples import TEST, TRAIN, VALID, Sample, SampleTable
from imgclf.data.split import _apply_groups, fold_table, random_split
from imgclf.errors import DataError, display_path
from imgclf.progress import task as progress_task

__all__ = ["from_folder", "from_pattern", "from_csv", "random_split", "load_source", "load_table"]

_TRAIN_DIR_NAMES = ("train", "training", "trn")
_VALID_DIR_NAMES = ("valid", "val", "validation", "dev")
_TEST_DIR_NAMES = ("test", "testing")


# ---------------------------------------------------------------------------------------------
# Folders


def from_folder(
    root: str | os.PathLike,
    valid_pct: float = 0.2,
    seed: int = 42,
    group_pattern: str | None = None,
) -> SampleTable:
    """Read class folders: `root/<class>/**/<image>`, or `root/{train,valid,test}/<class>/...`.

    When `root` holds `train/` and `valid/` (or `val/`, `validation/`), and optionally `test/`,
    those folders are the split; with only `train/` and `test/`, `test/` validates. Otherwise a
    seeded, stratified random split holds out `valid_pct` of each class.

    Args:
        root: The data folder.
        valid_pct: Fraction of each class held out when there are no split folders.
        seed: Seed of the random split.
        group_pattern: Regular expression whose first group, searched in the path relative to
            `root`, names the image's group (site, patient, ...); a group never straddles splits.

    Raises:
        DataError: The folder does not exist, or a random split is impossible.
    """
    root = _existing_folder(root)
    layout, notes = _split_layout(root)
    samples: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    per_class: Counter = Counter()
    class_dirs: dict[str, list[Path]] = defaultdict(list)
    visited = {_dir_key(root)}
    # The walk's length is unknown until it ends: the report counts files, without an ETA.
    with progress_task("Listing images", total=None) as advance:
        for split, folder in layout.items():
            for class_dir in _class_dirs(folder, skipped):
                class_dirs[class_dir.name].append(class_dir)
                walk = _walk(class_dir, visited, advance)
                skipped += walk.skipped
                per_class[class_dir.name] += len(walk.files)
                samples += [Sample(p, (class_dir.name,), split) for p in walk.files]
    for name in sorted(class_dirs):
        if per_class[name] == 0:
            shown = ", ".join(f"'{display_path(_rel(d, root))}'" for d in class_dirs[name])
            notes.append(f"class folder {shown} has no images: ignored")
    notes += _folders_of_folders(root, class_dirs)
    table = SampleTable(samples, sorted(c for c in per_class if per_class[c]), False, root, notes, skipped)
    _apply_groups(table, group_pattern)
    if set(layout) == {TRAIN}:
        table.samples = random_split(table.samples, valid_pct, seed)
    return table


def _split_layout(root: Path) -> tuple[dict[str, Path], list[str]]:
    """{split: folder} to read, and notes on how the split folders were understood."""
    subdirs = {p.name.lower(): p for p in _subdirs(root)}
    train = next((subdirs[n] for n in _TRAIN_DIR_NAMES if n in subdirs), None)
    # A class that happens to be called "train" holds images, not class folders.
    if train is None or not any(True for _ in _subdirs(train)):
        return {TRAIN: root}, []
    valid = next((subdirs[n] for n in _VALID_DIR_NAMES if n in subdirs), None)
    test = next((subdirs[n] for n in _TEST_DIR_NAMES if n in subdirs), None)
    layout = {TRAIN: train}
    notes: list[str] = []
    if valid is not None:
        layout[VALID] = valid
        if test is not None:
            layout[TEST] = test
    elif test is not None:
        layout[VALID] = test
        notes.append(f"no valid/ folder: '{test.name}/' is used for validation")
    else:
        notes.append(f"only a {train.name}/ folder: a random part of it is held out for validation")
    others = sorted(p.name for p in subdirs.values() if p not in layout.values())
    if others:
        notes.append(f"folders next to the split folders are ignored: {', '.join(map(display_path, others))}")
    return layout, notes


def _folders_of_folders(root: Path, class_dirs: dict[str, list[Path]]) -> list[str]:
    """Notes on class folders that hold only folders; an error when every one does with the
    same subfolders, which is a level of splits or folds taken for classes."""
    nested = {}
    for name, dirs in class_dirs.items():
        subs = [sorted(p.name for p in _subdirs(d)) for d in dirs]
        if all(subs) and not any(_has_files(d) for d in dirs):
            nested[name] = sorted({n for names in subs for n in names})
    if not nested:
        return []
    if len(nested) == len(class_dirs) >= 2 and len({tuple(v) for v in nested.values()}) == 1:
        inner = next(iter(nested.values()))
        raise DataError(
            f"{display_path(root)}: the class folders {', '.join(map(repr, sorted(nested)))} each "
            f"hold the same folders ({', '.join(inner[:5])}) and no images: they look like "
            "splits or folds, not classes: name them train/ and valid/, or pass the folder of "
            "one of them as DATA")
    return [f"class folder '{name}' holds only folders ({', '.join(subs[:3])}"
            f"{', ...' if len(subs) > 3 else ''}): all their images are labelled '{name}'"
            for name, subs in sorted(nested.items())]


def _has_files(folder: Path) -> bool:
    return any(_entry_kind(e, []) == "file" for e in _list_dir(folder, []))


def _class_dirs(folder: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """The class folders in `folder`; loose files there are recorded as skipped."""
    out = []
    for entry in _list_dir(folder, skipped):
        kind = _entry_kind(entry, skipped)
        if kind == "dir":
            out.append(Path(entry.path))
        elif kind == "file":
            skipped.append((Path(entry.path), "not inside a class folder: move it into a folder named after its class"))
    return out


# ---------------------------------------------------------------------------------------------
# File-name patterns


def from_pattern(
    root: str | os.PathLike,
    pattern: str,
    valid_pct: float = 0.2,
    seed: int = 42,
    group_pattern: str | None = None,
) -> SampleTable:
    """Read every image under `root`, labelled by a regular expression on its file name.

    The label is the first group of `re.search(pattern, file_name)`, or, when the file name does
    not match, of the search in the path relative to `root` (so a pattern can use folder names).
    For example `(.+)_\\d+\\.jpg$` labels `monkey_prosimian_9780.jpg` as `monkey_prosimian`.

    Args:
        root: The data folder.
        pattern: Regular expression with at least one group.
        valid_pct: Fraction of each class held out for validation.
        seed: Seed of the random split.
        group_pattern: As in `from_folder`.

    Raises:
        DataError: The folder does not exist, the pattern is invalid, or a split is impossible.
    """
    root = _existing_folder(root)
    rx = _compile(pattern, "label pattern")
    with progress_task("Listing images", total=None) as advance:
        walk = _walk(root, set(), advance)
    samples, skipped = [], list(walk.skipped)
    for path in walk.files:
        rel = _rel(path, root).as_posix()
        m = rx.search(path.name) or rx.search(rel)
        if m and m.group(1):
            samples.append(Sample(path, (m.group(1),), TRAIN))
        else:
            skipped.append((path, f"file name does not match the label pattern {pattern!r}"))
    classes = sorted({s.labels[0] for s in samples})
    table = SampleTable(samples, classes, False, root, [], skipped)
    _apply_groups(table, group_pattern)
    table.samples = random_split(table.samples, valid_pct, seed)
    return table


# ---------------------------------------------------------------------------------------------
# Groups and dispatch


def load_source(
    data: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    label_pattern: str | None = None,
    **options,
) -> SampleTable:
    """Read a data set the way the command line names it: a folder, a folder and a CSV, or a pattern.

    Args:
        data: The data folder (or a CSV file, whose folder is then the root).
        csv: A CSV file of labels (see `from_csv`).
        label_pattern: A regular expression labelling files by name (see `from_pattern`).
        **options: Options of the chosen source (valid_pct, seed, group_pattern, label_delim, ...);
            options left at None are ignored.

    Raises:
        DataError: The folder does not exist, holds no usable images, or fewer than two classes,
            or an option does not apply to this kind of source.
    """
    root = Path(data)
    if not root.exists():
        raise DataError(f"{display_path(root)}: data folder does not exist: check the path")
    if csv is None and root.is_file() and root.suffix.lower() in (".csv", ".tsv"):
        root, csv = root.parent, root
    if csv is not None and label_pattern is not None:
        raise DataError("pass either a CSV file or a label pattern, not both")
    if csv is not None:
        table = from_csv(root, csv, **_options_for(from_csv, options, "CSV"))
    elif label_pattern is not None:
        table = from_pattern(root, label_pattern, **_options_for(from_pattern, options, "label-pattern"))
    else:
        table = from_folder(root, **_options_for(from_folder, options, "folder"))
    _require_usable(table, kind="csv" if csv is not None else "pattern" if label_pattern else "folder")
    return table


def _options_for(fn, options: dict, kind: str) -> dict:
    accepted = inspect.signature(fn).parameters
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in accepted:
            raise DataError(f"option '{key}' does not apply to {kind} data sources")
        out[key] = value
    return out


def _require_usable(table: SampleTable, kind: str) -> None:
    where = display_path(table.root)
    if not table.samples:
        hint = {
            "folder": "put each class's images in its own folder (<data>/<class>/*.jpg), "
                      "or pass a CSV or a label pattern",
            "csv": "check that the CSV's file names are relative to the data folder",
            "pattern": "check that the label pattern matches the file names",
        }[kind]
        found = ""
        if table.skipped:
            path, reason = table.skipped[0]
            found = f" ({len(table.skipped)} files skipped, e.g. {display_path(table.relpath(path))}: {reason})"
        raise DataError(f"{where}: no usable images found{found}: {hint}")
    if not table.multi_label and len(table.classes) < 2:
        only = f"only one class ('{table.classes[0]}')" if table.classes else "no classes"
        raise DataError(f"{where}: found {only}; a classifier needs at least two: add images of another class")


def load_table(cfg: TrainConfig) -> SampleTable:
    """The data source named by a config, as a table of samples, with `cfg.corrections`
    applied (see `imgclf.data.corrections`; a digest in `cfg.corrections_sha256` must match)."""
    label_cols = cfg.label_cols
    if label_cols and label_cols != "auto":
        label_cols = [c.strip() for c in label_cols.split(",") if c.strip()]
    table = load_source(
        cfg.data, csv=cfg.csv, label_pattern=cfg.label_pattern, image_col=cfg.image_col,
        label_col=cfg.label_col, split_col=cfg.split_col,
        label_delim=cfg.label_delim if cfg.csv else None,
        label_cols=label_cols, multi_label=cfg.multi_label, group_col=cfg.group_col,
        group_pattern=cfg.group_pattern, valid_pct=cfg.valid_pct, seed=cfg.seed,
        allow_outside=cfg.allow_outside_data or None)
    if cfg.corrections:
        # Before the folds, so that cross-validation deals the corrected labels.
        table, _ = apply_corrections_file(table, cfg.corrections, cfg.corrections_sha256)
    if cfg.folds:
        table = fold_table(table, cfg.folds, cfg.fold, cfg.seed)
    return table
