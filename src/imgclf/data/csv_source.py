"""The CSV data source: a labels file whose file names are relative to the data folder."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

from imgclf.data.files import _existing_folder
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.samples import TEST, TRAIN, VALID, Sample, SampleTable
from imgclf.data.split import _apply_groups, random_split
from imgclf.errors import DataError, display_path
from imgclf.progress import task as progress_task

PROGRESS_THRESHOLD = 200  # rows; as imgclf.data.validate's: fewer finish before a bar helps

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
        wanted = _header_word(spec)
        if not self.header and self.rows and wanted in map(_header_word, self.rows[0][1]):
            # A header row imgclf did not recognise, named by the user: it is one after all.
            self.header = [h.strip() for h in self.rows.pop(0)[1]]
        lowered = [_header_word(h) for h in self.header]
        if wanted in lowered:
            return lowered.index(wanted)
        if spec.isdigit():
            return self.column(int(spec), default, what)
        known = ", ".join(self.header) if self.header else "none: the file has no header row"
        raise DataError(f"{self.name}: no column named {spec!r} for the {what} (columns: {known})")

    def find(self, names: tuple[str, ...], exclude: set[int]) -> int | None:
        lowered = [_header_word(h) for h in self.header]
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
    allow_outside: bool = False,
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
        multi_label: Force the task; None decides from the data: multi-label when rows carry
            several labels that also occur apart (see `_detect_multi_label`), single-label
            when no row does, and a DataError asking for the flag when the data cannot tell.
            A file listed on several rows (long format) gets the union of their labels in a
            multi-label task; in a single-label task different labels are a conflict.
        group_col: Column of the group id (site, patient, ...); a group never straddles splits.
        valid_pct: Fraction of each class held out when there is no split column.
        seed: Seed of the random split.
        group_pattern: As in `from_folder`, when there is no group column.
        allow_outside: Accept file names that lead outside `root` (absolute or ../ names);
            refused by default, so a labels file cannot make training read arbitrary files.

    Raises:
        DataError: The file or folder is missing, a named column does not exist, a cell of the
            split or one-hot columns cannot be understood, a file name leaves `root`, the task
            cannot be told from the labels, or a single-label file is given two labels.
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
    _refuse_outside(table, allow_outside)
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


def _header_word(cell: str) -> str:
    """'Image Name' and 'image-name' as the known header 'image_name'."""
    return "_".join(cell.strip().lower().replace("-", " ").split())


def _is_header(first: list[str], second: list[str] | None) -> bool:
    cells = {_header_word(c) for c in first}
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
    """(line, cells, labels) rows, one per file, rows skipped for a blank label, the task, and
    a note on what was detected or merged."""
    by_file: dict[str, list[tuple[int, list[str]]]] = {}
    for line, cells in table.rows:
        by_file.setdefault(_file_key(table, cells), []).append((line, cells))
    note = None
    if multi_label is None:
        multi_label, note = _detect_multi_label(table, col, delim, by_file)
    out = []
    if multi_label:
        merged = 0
        for entries in by_file.values():
            labels = sorted({lab for _, cells in entries
                             for lab in _split_labels(_cell(cells, col), delim)})
            merged += len({_cell(cells, col) for _, cells in entries}) > 1
            out.append((entries[0][0], entries[0][1], tuple(labels)))
        if merged:
            note = ((note + "; ") if note else "") + (
                f"{merged} files are listed on several rows with different labels: each gets "
                "the union of its rows' labels (long format)")
        return out, [], True, note
    conflicts, skipped = [], []
    for entries in by_file.values():
        # A blank label is "no label" in a multi-label task; here it leaves nothing to learn.
        for line, cells in entries:
            if not _cell(cells, col):
                skipped.append((table.row_path(cells), f"{table.name} row {line} has a blank label"))
        entries = [(line, cells) for line, cells in entries if _cell(cells, col)]
        if not entries:
            continue
        labels = dict.fromkeys(_cell(cells, col) for _, cells in entries)
        if len(labels) > 1:
            conflicts.append(f"{_cell(entries[0][1], table.image_col)}: " + ", ".join(
                f"row {line} says {_cell(cells, col)!r}" for line, cells in entries))
        out.append((entries[0][0], entries[0][1], (next(iter(labels)),)))
    if conflicts:
        raise DataError(
            f"{table.name}: {len(conflicts)} files are listed with different labels "
            f"({'; '.join(conflicts[:3])}{'; ...' if len(conflicts) > 3 else ''}): a single-label "
            "image has one label: fix those rows, or pass --multi-label if images may carry "
            "several labels")
    return out, skipped, False, note


def _file_key(table: _Csv, cells: list[str]) -> str:
    """Rows naming one file share a key (a row without a file name keeps its own)."""
    name = _cell(cells, table.image_col)
    return str(_join(table.root, name)) if name else f"\0{id(cells)}"


def _detect_multi_label(table: _Csv, col: int, delim: str | None,
                        by_file: dict[str, list[tuple[int, list[str]]]]) -> tuple[bool, str | None]:
    """Whether the labels describe a multi-label task, and the note saying why.

    Several labels on one row are not enough: "milk bottle" is one class with a space, and an
    unrecognised header "Object Type" is one cell of two words. Labels are taken to be
    independent only when every label of a several-label file also occurs in another
    combination (alone, or with other labels), as in real multi-label data; when no file has
    several labels the task is single-label; anything in between is asked of the user.
    """
    sets = {key: frozenset(lab for _, cells in entries
                           for lab in _split_labels(_cell(cells, col), delim))
            for key, entries in by_file.items()}
    several = [(key, labels) for key, labels in sets.items() if len(labels) > 1]
    if not several:
        return False, None
    combos: dict[str, set[frozenset]] = {}
    for labels in sets.values():
        for lab in labels:
            combos.setdefault(lab, set()).add(labels)
    lonely = sorted({lab for _, labels in several for lab in labels if len(combos[lab]) < 2})
    line, cells = by_file[several[0][0]][0]
    example = f"row {line}: {_cell(cells, col)!r}"
    # Class names hold spaces, not "|" or ",": a cell split on another separator is meant so.
    deliberate = delim is not None and not delim.isspace() and any(
        len(_split_labels(_cell(cells, col), delim)) > 1 for entries in by_file.values()
        for _, cells in entries)
    if deliberate or (len(several) >= 2 and not lonely):
        return True, (f"multi-label detected: {len(several)} files have several labels (e.g. "
                      f"{example}), each of which also occurs on its own or in other "
                      "combinations; pass --single-label if class names contain spaces")
    in_one_cell = [(line, cells) for key, _ in several for line, cells in by_file[key]
                   if len(_split_labels(_cell(cells, col), delim)) > 1]
    if not in_one_cell:
        # Only rows repeating a file with another label: a single-label conflict, which
        # the caller reports row by row.
        return False, None
    line, cells = in_one_cell[0]
    example = f"row {line}: {_cell(cells, col)!r}"
    raise DataError(
        f"{table.name}: cannot tell whether {example} is one class or several labels "
        f"({len(several)} files have several; {', '.join(map(repr, lonely[:4])) or 'too few'} "
        "occur in no other combination): pass "
        "--single-label if class names contain spaces, or --multi-label if images carry several "
        "labels (and check that the first row is not an unrecognised header)")


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
    # One stat per row: on a network file system a million rows take minutes, so say so.
    with progress_task("Finding the CSV's files", total=len(rows),
                       show=len(rows) > PROGRESS_THRESHOLD) as advance:
        for line, cells, labels in rows:
            advance()
            name = _cell(cells, table.image_col)
            if not name:
                skipped.append((Path(table.name), f"{table.name} row {line} has no file name"))
                continue
            path = _find_file(table.root, name)
            if path is None:
                skipped.append((_join(table.root, name),
                                f"listed in {table.name} row {line} but not found"))
            elif path in seen:
                skipped.append((path, f"listed again in {table.name} row {line}: row "
                                f"{seen[path]} is used"))
            else:
                seen[path] = line
                group = _cell(cells, group_col) or None
                samples.append(Sample(path, labels, splits.get(line, TRAIN), group))
    return samples, skipped


def _refuse_outside(table: _Csv, allow_outside: bool) -> None:
    """Refuse rows whose file name leads outside the data folder, before any file is opened."""
    if allow_outside:
        return
    root = str(table.root)
    outside = [(line, name) for line, cells in table.rows
               if (name := _cell(cells, table.image_col))
               and os.path.commonpath([root, str(_join(table.root, name))]) != root]
    if outside:
        line, name = outside[0]
        raise DataError(
            f"{table.name}: {len(outside)} rows name files outside the data folder "
            f"{display_path(table.root)} (row {line}: {name!r}): keep the images under the data "
            "folder and name them relative to it, or pass --allow-outside-data to read them")


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
