"""Corrections to a data set's labels, decided by a person (`imgclf review`) and applied on load.

A corrections file is a CSV with one row per image:

    path,action,labels,time,source
    /data/cat/cat_012.jpg,relabel,dog,2026-11-22T10:15:00+00:00,data
    /data/dog/dog_007.jpg,exclude,,2026-11-22T10:15:04+00:00,data
    /data/cat/cat_030.jpg,negative,negative,2026-11-22T10:15:09+00:00,data
    /data/cat/cat_031.jpg,keep,,2026-11-22T10:15:11+00:00,data

`path` is the image as the run's tables name it (absolute), or relative to the data folder.
`action` is one of keep (the label is right), relabel (`labels` are the new labels: one class
for single-label data, space-separated classes, possibly none, for multi-label data), exclude
(the image leaves the table) and negative (the image shows none of the classes). `time` is when
the decision was made (ISO 8601; informational). `source` is `data` (default) or `pool`: rows
about images of a hard-negative mining pool, which `imgclf mine` applies and training skips.

Negatives: in multi-label data an image marked negative keeps no label (mining's convention).
In single-label data it joins the negative class, named by its `labels` cell or `negative` (the
name `imgclf mine` gives it). When the data has no such class, the class is added: a softmax
model otherwise has to call every image one of the classes, which is what marking an image
negative says is wrong.

`apply_corrections` changes the table only when every row is valid: a file naming images not
in the data, labels not in the class list, or damaged rows raises one DataError that lists every
bad line, and nothing is applied. The user's folders and CSV files are never written.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from imgclf.data.samples import SampleTable
from imgclf.errors import DataError, display_path
from imgclf.io import atomic_write_text

COLUMNS = ("path", "action", "labels", "time", "source")
ACTIONS = ("keep", "relabel", "exclude", "negative")
SOURCES = ("data", "pool")
NEGATIVE_LABEL = "negative"
FILENAME = "corrections.csv"
# Bad lines listed in one error message; the count of the rest follows.
MAX_LISTED = 25


@dataclass(frozen=True)
class Correction:
    """One decision about one image.

    Attributes:
        path: The image, as written in the file.
        action: One of ACTIONS.
        labels: The `labels` cell as written (parsed against the task when applied).
        time: When it was decided (ISO 8601 text; may be empty).
        source: "data" or "pool" (an image of a mining pool).
        line: Line number in the file (1 is the header); 0 for corrections made in memory.
    """

    path: str
    action: str
    labels: str = ""
    time: str = ""
    source: str = "data"
    line: int = 0

    def label_list(self, multi_label: bool) -> list[str]:
        """The labels of the cell: one name (single-label), or whitespace-separated names."""
        text = self.labels.strip()
        if multi_label:
            return text.split()
        return [text] if text else []

    def to_row(self) -> dict:
        return {"path": self.path, "action": self.action, "labels": self.labels,
                "time": self.time, "source": self.source}


@dataclass
class Applied:
    """What `apply_corrections` did, for the data summary.

    Attributes:
        counts: Rows applied per action.
        relabelled: (path, old labels, new labels) per relabelled image.
        added_class: The negative class when it was added to the class list, else None.
        pool_rows: Rows about mining-pool images (not applied to the table).
        pool_removed: Pool images excluded or relabelled (they show a class, or are not to be
            used), which leave the pool; filled only when `apply_corrections` gets the pool.
    """

    counts: Counter
    relabelled: list[tuple[str, tuple[str, ...], tuple[str, ...]]]
    added_class: str | None = None
    pool_rows: int = 0
    pool_removed: list[str] = field(default_factory=list)


def now() -> str:
    """The current time as written in the `time` column (UTC, seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fail(path, problems: list[str], what: str) -> None:
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    listing = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    raise DataError(f"{display_path(path)}: {len(problems)} bad line"
                    f"{'s' if len(problems) > 1 else ''} {what}, nothing was applied: {listing}")


def read_corrections(path: str | os.PathLike) -> list[Correction]:
    """Parse a corrections file, checking every line; the last column may be missing.

    Raises:
        DataError: The file is missing or unreadable, or lines are damaged (wrong number of
            cells, no path, unknown action or source, a second different decision for one
            image); one error lists them all.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{display_path(path)}: cannot read the corrections file "
                        f"({e.strerror or e}): check --corrections") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{display_path(path)}: not a UTF-8 text CSV (byte {e.start}): pass the "
                        "corrections.csv that `imgclf review` wrote") from None
    if "\0" in text:
        raise DataError(f"{display_path(path)}: holds NUL bytes, not a text CSV: pass the "
                        "corrections.csv that `imgclf review` wrote")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("path", "action") if c not in header]
    if missing:
        raise DataError(f"{display_path(path)}: line 1 must be the header "
                        f"{','.join(COLUMNS)} (no {' or '.join(missing)} column)")
    col = {h: i for i, h in enumerate(header)}
    problems: list[str] = []
    out: list[Correction] = []
    seen: dict[str, Correction] = {}
    for n, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            problems.append(f"line {n}: {len(cells)} cells, the header has {len(header)}")
            continue
        get = {h: cells[i] for h, i in col.items()}
        c = Correction(path=get["path"].strip(), action=get["action"].strip().lower(),
                       labels=get.get("labels", ""), time=get.get("time", "").strip(),
                       source=(get.get("source", "") or "data").strip().lower(), line=n)
        bad = _row_problem(c)
        if bad is None and c.path in seen and _decision(seen[c.path]) != _decision(c):
            bad = (f"'{display_path(c.path)}' is decided on line {seen[c.path].line} too, "
                   "differently: keep one of the two")
        if bad is not None:
            problems.append(f"line {n}: {bad}")
            continue
        if c.path not in seen:
            out.append(c)
        seen[c.path] = c
    if problems:
        _fail(path, problems, "in the corrections file")
    return out


def _decision(c: Correction) -> tuple:
    return c.action, c.labels.strip(), c.source


def _row_problem(c: Correction) -> str | None:
    if not c.path:
        return "no path"
    if c.action not in ACTIONS:
        close = difflib.get_close_matches(c.action, ACTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"action '{c.action}' is not one of {', '.join(ACTIONS)}{hint}"
    if c.source not in SOURCES:
        return f"source '{c.source}' is not one of {', '.join(SOURCES)}"
    return None


def write_corrections(path: str | os.PathLike, corrections: list[Correction]) -> None:
    """Write a corrections file atomically (a reader never sees half of it)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for c in corrections:
        w.writerow(c.to_row())
    atomic_write_text(path, buf.getvalue())


def _key(path: str | os.PathLike, root: Path | None) -> str:
    p = Path(os.fsdecode(path))
    if not p.is_absolute() and root is not None:
        p = root / p
    return os.path.normpath(os.path.abspath(p))


def apply_corrections(table: SampleTable, corrections: list[Correction], *,
                      source: str | os.PathLike | None = None, digest: str | None = None,
                      negative_label: str = NEGATIVE_LABEL,
                      pool: list[str | os.PathLike] | None = None) -> tuple[SampleTable, Applied]:
    """The table with the corrections applied, and what was done (also noted on the table).

    Rows whose source is "pool" are not applied to the table: they are mining's. Without `pool`
    they are skipped (a note says so); with it, each must name one of its images, and those
    excluded or relabelled are listed in `Applied.pool_removed`.

    Args:
        table: The table as the source read it.
        corrections: From `read_corrections` (or made in memory).
        source: The file they came from, named in the messages and the note.
        digest: Its sha256, shown (shortened) in the note.
        negative_label: The negative class of single-label data when a row does not name one.
        pool: The images of a mining pool (`imgclf mine`).

    Raises:
        DataError: Rows naming images not in the table, labels not in its classes, or a
            relabel without a label; one error lists every bad line, and nothing is applied.
    """
    where = source if source is not None else "corrections"
    by_key: dict[str, int] = {}
    by_real: dict[str, int] = {}
    for i, s in enumerate(table.samples):
        by_key[_key(s.path, None)] = i
    classes = set(table.classes)
    multi = table.multi_label
    problems: list[str] = []
    changes: dict[int, Correction] = {}
    pool_rows, pool_removed = 0, []
    in_pool = None if pool is None else {os.path.realpath(p): str(p) for p in pool}
    negative_names: set[str] = set()
    for c in corrections:
        at = f"line {c.line}" if c.line else f"'{display_path(c.path)}'"
        if c.source == "pool":
            pool_rows += 1
            if in_pool is not None:
                found = in_pool.get(os.path.realpath(_key(c.path, None)))
                if found is None:
                    problems.append(f"{at}: '{display_path(c.path)}' is not an image of the "
                                    "mining pool")
                elif c.action in ("exclude", "relabel"):
                    pool_removed.append(found)
            continue
        i = by_key.get(_key(c.path, table.root))
        if i is None:  # the same file through another name (a symlink, ../)
            if not by_real:
                by_real.update({os.path.realpath(s.path): j for j, s in enumerate(table.samples)})
            i = by_real.get(os.path.realpath(_key(c.path, table.root)))
        if i is None:
            problems.append(f"{at}: '{display_path(c.path)}' is not an image of the data")
            continue
        if i in changes:
            problems.append(f"{at}: '{display_path(c.path)}' is decided on "
                            f"line {changes[i].line} too")
            continue
        labels = c.label_list(multi)
        if c.action == "relabel":
            if not multi and not labels:
                problems.append(f"{at}: relabel without a label: name the new class in the "
                                "labels column")
                continue
            unknown = [x for x in labels if x not in classes]
            if unknown:
                problems.append(f"{at}: {_unknown(unknown, classes)}")
                continue
        if c.action == "negative" and not multi:
            negative_names.add(labels[0] if labels else negative_label)
        changes[i] = c
    if len(negative_names) > 1:
        problems.append(f"images are marked negative under several class names "
                        f"({', '.join(sorted(negative_names))}): use one")
    if problems:
        _fail(where, problems, "in the corrections")

    negative = next(iter(negative_names), negative_label)
    samples, counts, relabelled = [], Counter(), []
    for i, s in enumerate(table.samples):
        c = changes.get(i)
        if c is None:
            samples.append(s)
            continue
        counts[c.action] += 1
        if c.action == "exclude":
            continue
        if c.action == "relabel":
            new = tuple(sorted(set(c.label_list(multi)))) if multi else tuple(c.label_list(multi))
            relabelled.append((str(s.path), s.labels, new))
            s = replace(s, labels=new)
        elif c.action == "negative":
            s = replace(s, labels=() if multi else (negative,))
        samples.append(s)
    out = table.with_samples(samples)
    added = None
    if counts["negative"] and not multi and negative not in classes:
        added = negative
    # A class the corrections took every image from leaves the class list (as an empty class
    # folder does); one that had no image before is the source's business.
    used_before = {x for s in table.samples for x in s.labels}
    used = {x for s in samples for x in s.labels}
    out.classes = sorted(x for x in classes | ({added} if added else set())
                         if x in used or x not in used_before)
    applied = Applied(counts, relabelled, added, pool_rows, pool_removed)
    out.notes.extend(_notes(applied, table, out, where, digest, pool is not None))
    return out, applied


def _unknown(unknown: list[str], classes: set[str]) -> str:
    names = ", ".join(f"'{x}'" for x in unknown)
    close = difflib.get_close_matches(unknown[0], sorted(classes), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"label {names} is not a class of the data{hint}; the classes are "
            f"{', '.join(sorted(classes)[:12])}{', ...' if len(classes) > 12 else ''}")


def _notes(a: Applied, before: SampleTable, after: SampleTable, where, digest,
           with_pool: bool) -> list[str]:
    name = Path(os.fsdecode(where)).name
    sha = f", sha256 {digest[:12]}" if digest else ""
    parts = [f"{a.counts[k]} {w}" for k, w in (("relabel", "relabelled"), ("exclude", "excluded"),
                                                ("negative", "marked negative"),
                                                ("keep", "kept as labelled"))]
    notes = [f"corrections applied ({name}{sha}): {', '.join(parts)}"]
    if a.added_class:
        notes.append(f"class '{a.added_class}' added for the {a.counts['negative']} images marked "
                     "negative (the data had no such class)")
    dropped = sorted(set(before.classes) - set(after.classes))
    if dropped:
        notes.append(f"class(es) {', '.join(dropped)} left without images by the corrections: "
                     "removed")
    if with_pool and a.pool_removed:
        notes.append(f"{len(a.pool_removed)} mining-pool images excluded or relabelled: they "
                     "leave the pool")
    elif a.pool_rows and not with_pool:
        notes.append(f"{a.pool_rows} corrections about mining-pool images apply to "
                     "`imgclf mine` only: not applied here")
    return notes


def apply_file(table: SampleTable, path: str | os.PathLike, expected_digest: str | None = None,
               negative_label: str = NEGATIVE_LABEL) -> tuple[SampleTable, Applied]:
    """`apply_corrections` on a file, refusing one whose digest is not `expected_digest`.

    Raises:
        DataError: As `read_corrections` and `apply_corrections`, or the file changed since
            the run recorded its digest.
    """
    corrections = read_corrections(path)
    digest = file_digest(path)
    if expected_digest and digest != expected_digest:
        raise DataError(f"{display_path(path)}: the corrections file changed since the run "
                        f"recorded it (sha256 {expected_digest[:12]}..., now {digest[:12]}...): "
                        "restore it, or start a new run with the new file")
    return apply_corrections(table, corrections, source=path, digest=digest,
                             negative_label=negative_label)


def pin(cfg) -> None:
    """Record the sha256 of `cfg.corrections` in `cfg.corrections_sha256` (a TrainConfig), so
    that config.yaml names the exact file; a digest already there must match the file.

    Raises:
        DataError: The file cannot be read, or does not match the recorded digest.
    """
    if not cfg.corrections:
        return
    try:
        digest = file_digest(cfg.corrections)
    except OSError as e:
        raise DataError(f"{display_path(cfg.corrections)}: cannot read the corrections file "
                        f"({e.strerror or e}): check --corrections") from None
    if cfg.corrections_sha256 and cfg.corrections_sha256 != digest:
        raise DataError(f"{display_path(cfg.corrections)}: the corrections file changed since "
                        f"the run recorded it (sha256 {cfg.corrections_sha256[:12]}..., now "
                        f"{digest[:12]}...): restore it, or start a new run with the new file")
    cfg.corrections_sha256 = digest
