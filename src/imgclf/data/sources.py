"""Data sources: class folders, a CSV of labels, or labels in file names, each read into a SampleTable.

Sources only look at names and folders; whether a file decodes is checked later (`validate.py`).
Files that cannot be used are listed in `SampleTable.skipped` with the reason, never silently lost,
except hidden files (.DS_Store, .ipynb_checkpoints, ...), which no one means as data.
"""

from __future__ import annotations

import csv
import errno
import inspect
import io
import os
import random
import re
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.samples import TEST, TRAIN, VALID, Sample, SampleTable
from imgclf.errors import DataError, display_path

# Operating-system clutter that is not hidden by a leading dot.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__", "$RECYCLE.BIN"})
_VALID_DIR_NAMES = ("valid", "val", "validation")
_SPLIT_WORDS = {
    "train": TRAIN, "training": TRAIN, "trn": TRAIN,
    "valid": VALID, "validation": VALID, "val": VALID, "dev": VALID,
    "test": TEST, "testing": TEST,
}
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "t": True, "f": False, "y": True, "n": False, "1.0": True, "0.0": False}
_IMAGE_COLUMNS = ("filename", "file_name", "file", "fname", "image", "image_name", "image_id",
                  "img", "path", "filepath", "file_path", "image_path", "name", "id")
_LABEL_COLUMNS = ("label", "labels", "tags", "tag", "class", "classes", "category", "target", "y")
_SPLIT_COLUMNS = ("split", "is_valid", "is_validation", "subset", "set", "fold_split")


@dataclass
class _Walk:
    """Files found under a folder, and those that cannot be used."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


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
    for split, folder in layout.items():
        for class_dir in _class_dirs(folder, skipped):
            class_dirs[class_dir.name].append(class_dir)
            walk = _walk(class_dir, visited)
            skipped += walk.skipped
            per_class[class_dir.name] += len(walk.files)
            samples += [Sample(p, (class_dir.name,), split) for p in walk.files]
    for name in sorted(class_dirs):
        if per_class[name] == 0:
            shown = ", ".join(f"'{display_path(_rel(d, root))}'" for d in class_dirs[name])
            notes.append(f"class folder {shown} has no images: ignored")
    table = SampleTable(samples, sorted(c for c in per_class if per_class[c]), False, root, notes, skipped)
    _apply_groups(table, group_pattern)
    if set(layout) == {TRAIN}:
        table.samples = random_split(table.samples, valid_pct, seed)
    return table


def _split_layout(root: Path) -> tuple[dict[str, Path], list[str]]:
    """{split: folder} to read, and notes on how the split folders were understood."""
    subdirs = {p.name.lower(): p for p in _subdirs(root)}
    train = subdirs.get("train")
    # A class that happens to be called "train" holds images, not class folders.
    if train is None or not any(True for _ in _subdirs(train)):
        return {TRAIN: root}, []
    valid = next((subdirs[n] for n in _VALID_DIR_NAMES if n in subdirs), None)
    test = subdirs.get("test")
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
        notes.append("only a train/ folder: a random part of it is held out for validation")
    others = sorted(p.name for p in subdirs.values() if p not in layout.values())
    if others:
        notes.append(f"folders next to the split folders are ignored: {', '.join(map(display_path, others))}")
    return layout, notes


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


def _walk(folder: Path, visited: set) -> _Walk:
    """Image files under `folder`, recursively and in sorted order, surviving links and bad folders.

    Args:
        folder: Where to start.
        visited: (device, inode) of folders already walked; a symbolic link back to one of them
            (a loop, or a second path to the same images) is not followed again. Updated in place.
    """
    out = _Walk()
    visited.add(_dir_key(folder))
    stack = [folder]
    while stack:
        current = stack.pop()
        subfolders = []
        for entry in _list_dir(current, out.skipped):
            kind = _entry_kind(entry, out.skipped)
            path = Path(entry.path)
            if kind == "dir":
                key = _dir_key(path)
                if key is not None and key not in visited:
                    visited.add(key)
                    subfolders.append(path)
            elif kind == "file":
                reason = _not_image_reason(path)
                if reason:
                    out.skipped.append((path, reason))
                else:
                    out.files.append(path)
        stack.extend(reversed(subfolders))  # so files come out in sorted, depth-first order
    return out


def _list_dir(folder: Path, skipped: list[tuple[Path, str]]) -> list[os.DirEntry]:
    """Visible entries of a folder, sorted by name; an unreadable folder is recorded and yields none."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not _hidden(e.name)]
    except PermissionError:
        skipped.append((folder, "cannot read this folder (permission denied): fix its permissions"))
        return []
    except OSError as e:
        skipped.append((folder, f"cannot read this folder ({e.strerror or e})"))
        return []
    return sorted(entries, key=lambda e: e.name)


def _entry_kind(entry: os.DirEntry, skipped: list[tuple[Path, str]]) -> str | None:
    """'dir', 'file' or None (recorded as skipped when it is a broken link or similar)."""
    try:
        mode = entry.stat().st_mode  # follows symbolic links
    except FileNotFoundError:
        skipped.append((Path(entry.path), "broken symbolic link: fix or remove it"))
        return None
    except OSError as e:
        why = "symbolic link loop: remove the link" if e.errno == errno.ELOOP else f"cannot read ({e.strerror or e})"
        skipped.append((Path(entry.path), why))
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    skipped.append((Path(entry.path), "not a regular file"))
    return None


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _subdirs(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _list_dir(folder, []) if _entry_kind(e, []) == "dir"]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _not_image_reason(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix in (".heic", ".heif"):
        return "HEIC/HEIF photos are not supported: convert them to JPEG"
    return f"not an image file ({display_path(suffix) if suffix else 'no extension'})"


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
    walk = _walk(root, set())
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
# CSV files


@dataclass
class _Csv:
    """A CSV file read into memory: header (empty if none) and (line number, cells) rows."""

    name: str
    root: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]
    image_col: int = 0

    def row_path(self, cells: list[str]) -> Path:
        """The file a row names (for messages about the row), or the CSV file if it names none."""
        name = _cell(cells, self.image_col)
        return _join(self.root, name) if name else Path(self.name)

    def column(self, spec: str | int | None, default: int | None, what: str) -> int | None:
        """Index of a column named by header name or 0-based number, or the default."""
        if spec is None:
            return default
        if isinstance(spec, int):
            width = max((len(r) for _, r in self.rows), default=0)
            if not 0 <= spec < max(width, len(self.header)):
                raise DataError(f"{self.name}: has no column number {spec} for the {what}")
            return spec
        lowered = [h.strip().lower() for h in self.header]
        if spec.strip().lower() in lowered:
            return lowered.index(spec.strip().lower())
        if spec.isdigit():
            return self.column(int(spec), default, what)
        known = ", ".join(self.header) if self.header else "none: the file has no header row"
        raise DataError(f"{self.name}: no column named {spec!r} for the {what} (columns: {known})")

    def find(self, names: tuple[str, ...], exclude: set[int]) -> int | None:
        lowered = [h.strip().lower() for h in self.header]
        for name in names:
            if name in lowered and lowered.index(name) not in exclude:
                return lowered.index(name)
        return None


def from_csv(
    root: str | os.PathLike,
    csv_path: str | os.PathLike,
    image_col: str | int | None = None,
    label_col: str | int | None = None,
    split_col: str | int | None = None,
    label_delim: str | None = " ",
    label_cols: list[str] | str | None = None,
    multi_label: bool | None = None,
    group_col: str | int | None = None,
    valid_pct: float = 0.2,
    seed: int = 42,
    group_pattern: str | None = None,
) -> SampleTable:
    """Read labels from a CSV file whose rows name image files relative to `root`.

    Columns default to the first for the file name and the second for the label, or to headers
    such as filename/image/path and label/labels/tags/class. A label cell may hold several labels
    separated by `label_delim`; then the task is multi-label. One-hot files name their label
    columns in `label_cols` ("auto": every other column holding only 0 and 1).

    Args:
        root: Folder the file names are relative to (absolute names are allowed too).
        csv_path: The CSV file, absolute, relative to the working folder, or relative to `root`.
        image_col: Column of the file names (header name or 0-based number).
        label_col: Column of the labels.
        split_col: Column of the split: train/valid/test words, or a boolean is_valid column.
            Columns named split or is_valid are used without being named here.
        label_delim: Separator of several labels in one cell; None never splits.
        label_cols: One-hot label columns, or "auto"; the task is then multi-label.
        multi_label: Force the task; None decides from the data (several labels in a row).
        group_col: Column of the group id (site, patient, ...); a group never straddles splits.
        valid_pct: Fraction of each class held out when there is no split column.
        seed: Seed of the random split.
        group_pattern: As in `from_folder`, when there is no group column.

    Raises:
        DataError: The file or folder is missing, a named column does not exist, or a cell of the
            split or one-hot columns cannot be understood.
    """
    root = _existing_folder(root)
    table = _read_csv(_existing_csv(root, csv_path), root)
    taken: set[int] = set()
    table.image_col = table.column(image_col, table.find(_IMAGE_COLUMNS, taken) or 0, "file names")
    taken.add(table.image_col)
    split, notes = _split_column(table, split_col, taken)
    if split is not None:
        taken.add(split)
    group = table.column(group_col, None, "group")
    if group is not None:
        taken.add(group)

    if label_cols is not None:
        onehot = _onehot_columns(table, label_cols, taken)
        labelled, skipped, multi = _onehot_labels(table, onehot, multi_label)
        classes: list[str] | None = sorted(table.header[i].strip() for i in onehot)
    else:
        lab = table.column(label_col, _default_label_column(table, taken), "labels")
        labelled, skipped, multi, note = _cell_labels(table, lab, label_delim, multi_label)
        notes += [note] if note else []
        classes = None

    splits = _read_splits(table, split) if split is not None else {}
    samples, missing = _resolve_rows(table, labelled, splits, group)
    if classes is None:  # from the rows whose file exists, so every class has images
        classes = sorted({c for s in samples for c in s.labels})
    table_out = SampleTable(samples, classes, multi, root, notes, skipped + missing)
    if group is None:
        _apply_groups(table_out, group_pattern)
    _finish_csv_split(table_out, has_split=split is not None, valid_pct=valid_pct, seed=seed)
    return table_out


def _existing_csv(root: Path, csv_path: str | os.PathLike) -> Path:
    path = Path(csv_path)
    for candidate in (path, root / path):
        if candidate.is_file():
            return Path(os.path.abspath(candidate))
    raise DataError(f"{display_path(csv_path)}: CSV file not found (looked here and in {display_path(root)})")


def _read_csv(path: Path, root: Path) -> _Csv:
    """Rows of a CSV file, tolerating a BOM, Windows line ends, blank lines and ; or tab separators."""
    name = display_path(path.name if path.parent == root else path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text: save it as 'CSV UTF-8'") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read the CSV file ({e.strerror or e})") from None
    first_line = text.split("\n", 1)[0]
    delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first_line and "," not in first_line) else (
        ";" if ";" in first_line and "," not in first_line else ","
    )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    rows = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, cells))
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: {e}: fix the quoting") from None
    if not rows:
        raise DataError(f"{name}: the CSV file has no rows")
    header: list[str] = []
    if _is_header(rows[0][1], rows[1][1] if len(rows) > 1 else None):
        header = [h.strip() for h in rows.pop(0)[1]]
    return _Csv(name, root, header, rows)


def _is_header(first: list[str], second: list[str] | None) -> bool:
    cells = {c.strip().lower() for c in first}
    if cells & set(_IMAGE_COLUMNS + _LABEL_COLUMNS + _SPLIT_COLUMNS):
        return True
    # A header's first cell is not a file name while the data's first cells are.
    looks_like_file = lambda c: Path(c.strip()).suffix.lower() in IMAGE_EXTENSIONS  # noqa: E731
    return second is not None and not looks_like_file(first[0]) and looks_like_file(second[0])


def _default_label_column(table: _Csv, taken: set[int]) -> int:
    found = table.find(_LABEL_COLUMNS, taken)
    if found is not None:
        return found
    width = max(len(table.header), max(len(r) for _, r in table.rows))
    free = [i for i in range(width) if i not in taken]
    if not free:
        raise DataError(f"{table.name}: no label column: add one, or name it with label_col")
    return free[0]


def _cell(cells: list[str], index: int | None) -> str:
    return cells[index].strip() if index is not None and index < len(cells) else ""


def _cell_labels(
    table: _Csv, col: int, delim: str | None, multi_label: bool | None
) -> tuple[list[tuple[int, list[str], tuple[str, ...]]], list[tuple[Path, str]], bool, str | None]:
    """(line, cells, labels) rows, rows skipped for a blank label, the task, and a detection note."""
    split_cells = [(line, cells, _split_labels(_cell(cells, col), delim)) for line, cells in table.rows]
    note = None
    if multi_label is None:
        first_multi = next(((line, labels) for line, _, labels in split_cells if len(labels) > 1), None)
        multi_label = first_multi is not None
        if first_multi:
            line, labels = first_multi
            note = (f"multi-label detected: row {line} has {len(labels)} labels "
                    f"({', '.join(map(repr, labels))}); if class names contain spaces, pass multi_label=False")
    out, skipped = [], []
    for line, cells, labels in split_cells:
        if multi_label:
            out.append((line, cells, tuple(sorted(labels))))
        elif _cell(cells, col):
            out.append((line, cells, (_cell(cells, col),)))
        else:
            skipped.append((table.row_path(cells), f"{table.name} row {line} has a blank label"))
    return out, skipped, multi_label, note


def _split_labels(cell: str, delim: str | None) -> tuple[str, ...]:
    if delim is None:
        parts = [cell]
    elif delim.isspace():
        parts = cell.split()
    else:
        parts = cell.split(delim)
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _onehot_columns(table: _Csv, label_cols: list[str] | str, taken: set[int]) -> list[int]:
    if not table.header:
        raise DataError(f"{table.name}: one-hot label columns need a header row naming the classes")
    if label_cols != "auto":
        names = [label_cols] if isinstance(label_cols, str) else list(label_cols)
        return [table.column(n, None, "one-hot labels") for n in names]
    found = [i for i in range(len(table.header)) if i not in taken
             and all(_cell(cells, i) in ("0", "1", "0.0", "1.0") for _, cells in table.rows)]
    if not found:
        raise DataError(f"{table.name}: no one-hot label columns (holding only 0 and 1) found: name them in label_cols")
    return found


def _onehot_labels(
    table: _Csv, cols: list[int], multi_label: bool | None
) -> tuple[list[tuple[int, list[str], tuple[str, ...]]], list[tuple[Path, str]], bool]:
    out, skipped = [], []
    single = multi_label is False
    for line, cells in table.rows:
        values = {i: _cell(cells, i) for i in cols}
        bad = next((i for i, v in values.items() if v not in ("0", "1", "0.0", "1.0")), None)
        if bad is not None:
            raise DataError(f"{table.name} row {line}: column '{table.header[bad]}' holds "
                            f"{values[bad]!r}; one-hot columns must hold 0 or 1")
        labels = tuple(sorted(table.header[i].strip() for i, v in values.items() if float(v) == 1))
        if single and len(labels) != 1:
            skipped.append((table.row_path(cells), f"{table.name} row {line} has {len(labels)} labels, "
                            "but the task is single-label"))
            continue
        out.append((line, cells, labels))
    return out, skipped, not single


def _split_column(table: _Csv, split_col: str | int | None, taken: set[int]) -> tuple[int | None, list[str]]:
    """The split column and a note; a column only named like one is dropped if its values are not splits."""
    split = table.column(split_col, table.find(_SPLIT_COLUMNS, taken), "split")
    if split is None or split_col is not None:
        return split, []
    try:
        _read_splits(table, split)
    except DataError as e:
        return None, [f"column '{table.header[split]}' is not a split ({e}): a random split is used"]
    return split, [f"split read from column '{table.header[split]}'"]


def _read_splits(table: _Csv, col: int) -> dict[int, str]:
    """{line: split} from a split column of split words or booleans (true = validation)."""
    values = {line: _cell(cells, col).lower() for line, cells in table.rows}
    words = _SPLIT_WORDS if any(v in _SPLIT_WORDS and v not in _BOOL_WORDS for v in values.values()) else None
    out = {}
    for line, value in values.items():
        if not value:
            raise DataError(f"{table.name} row {line}: the split cell is blank: fill in train, valid or test")
        if words is not None and value in words:
            out[line] = words[value]
        elif words is None and value in _BOOL_WORDS:
            out[line] = VALID if _BOOL_WORDS[value] else TRAIN
        else:
            raise DataError(f"{table.name} row {line}: split value {value!r} is not train/valid/test "
                            "or true/false: fix the split column")
    return out


def _resolve_rows(
    table: _Csv,
    rows: list[tuple[int, list[str], tuple[str, ...]]],
    splits: dict[int, str],
    group_col: int | None,
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Samples for the rows whose file exists; rows naming a missing or repeated file are skipped."""
    samples, skipped = [], []
    seen: dict[Path, int] = {}
    for line, cells, labels in rows:
        name = _cell(cells, table.image_col)
        if not name:
            skipped.append((Path(table.name), f"{table.name} row {line} has no file name"))
            continue
        path = _find_file(table.root, name)
        if path is None:
            skipped.append((_join(table.root, name), f"listed in {table.name} row {line} but not found"))
        elif path in seen:
            skipped.append((path, f"listed again in {table.name} row {line}: row {seen[path]} is used"))
        else:
            seen[path] = line
            group = _cell(cells, group_col) or None
            samples.append(Sample(path, labels, splits.get(line, TRAIN), group))
    return samples, skipped


def _join(root: Path, name: str) -> Path:
    if os.sep == "/" and "\\" in name:
        name = name.replace("\\", "/")  # written on Windows
    return Path(os.path.abspath(root / name))


def _find_file(root: Path, name: str) -> Path | None:
    """The file a CSV cell names; a name without extension (an image id) may add a common one."""
    path = _join(root, name)
    if path.is_file():
        return path
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        for ext in (".jpg", ".png", ".jpeg", ".tif", ".webp", ".bmp", ".gif"):
            candidate = path.with_name(path.name + ext)
            if candidate.is_file():
                return candidate
    return None


def _finish_csv_split(table: SampleTable, has_split: bool, valid_pct: float, seed: int) -> None:
    present = {s.split for s in table.samples}
    if has_split and VALID not in present and TEST in present:
        table.notes.append("the split column has no validation rows: the test rows are used for validation")
        table.samples = [replace(s, split=VALID) if s.split == TEST else s for s in table.samples]
    elif not has_split or VALID not in present:
        if has_split:
            table.notes.append("the split column marks no validation rows: a random part is held out")
        table.samples = random_split(table.samples, valid_pct, seed, table.multi_label)


# ---------------------------------------------------------------------------------------------
# Splitting


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


# ---------------------------------------------------------------------------------------------
# Groups and dispatch


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
    if unmatched:
        table.notes.append(f"{unmatched} files do not match the group pattern {group_pattern!r}: "
                           "each is its own group")
    table.samples = out


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


def _existing_folder(root: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(root))
    if not path.exists():
        raise DataError(f"{display_path(root)}: data folder does not exist: check the path")
    if not path.is_dir():
        raise DataError(f"{display_path(root)}: is a file, not a folder: pass the folder that holds the images")
    return path


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None
    if rx.groups < 1:
        raise DataError(f"{what} {pattern!r} has no (...) group: put the part that names it in parentheses")
    return rx


def _rel(path: Path, root: Path | None) -> Path:
    if root is not None:
        try:
            return path.relative_to(root)
        except ValueError:
            pass
    return path
