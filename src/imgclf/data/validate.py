"""Checks before training: what is wrong with the images, found before it costs a run.

`check_table` opens every image once (in threads), drops the ones that cannot be used, counts
colour conversions and finds identical files across splits (leakage) and within them, and
nearly identical images across splits (a perceptual hash: resized or re-encoded copies).
`imgclf.data.summary.summarize` then turns the checked table into the data summary.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from imgclf.data.file_index import FileCheck
from imgclf.data.images import ImageInfo, bytes_digest, file_digest, open_rgb_with_info, read_bytes
from imgclf.data.near_duplicates import (CONFIRM_CORRELATION, NEAR_DUPLICATE_BITS,  # noqa: F401
                                         hamming_distances, image_hash, near_pairs,
                                         perceptual_hash,
                                         detail, pixel_similarity)
from imgclf.data.samples import TEST, TRAIN, VALID, Sample, SampleTable
# DataSummary and summarize lived here; benchmarks/report_scale.py still imports them from here.
from imgclf.data.summary import DataSummary, summarize  # noqa: F401
from imgclf.errors import DataError, ImageError, display_path
from imgclf.progress import task as progress_task

PROGRESS_THRESHOLD = 200  # smaller scans finish before a bar would help
SCAN_CHUNK = 64  # files per task handed to scan_images' threads
NEAR_THUMBS_HELD = 4096  # near-duplicate confirmation: thumbnails kept while pairs are compared
# Hashes of training and validation images up to NEAR_DUPLICATE_BITS apart (of 64) are
# near-duplicate candidates. On Imagenette's 1000 train x 1000 val distinct photos no pair is
# within 4 bits (the closest is 5); Caltech-101's known near-copies across train/test (the same
# drawing re-saved) are within 0-3.


def default_workers() -> int:
    """Threads for decoding: the CPU cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def image_info(path: str | os.PathLike) -> ImageInfo:
    """The default scan: decode the file fully (so damage is found) and describe it."""
    return open_rgb_with_info(path)[1]


def file_check(path: str | os.PathLike) -> FileCheck:
    """`check_table`'s default: one read and one decode give the description, the digest and
    the perceptual hash (the decode cache does the same and presizes too)."""
    data = read_bytes(path)
    st = os.stat(path)
    img, info = open_rgb_with_info(data, name=path)
    try:
        phash = image_hash(img)
    except Exception:  # noqa: BLE001 - a picture too odd to hash is still a usable picture
        phash = None
    return FileCheck(info, bytes_digest(data), phash, st.st_size, st.st_mtime_ns)


def scan_images(
    samples: Iterable[Sample | str | os.PathLike],
    fn: Callable[[Path], object] | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    description: str = "Checking images",
) -> tuple[dict[Path, object], dict[Path, str]]:
    """Run `fn` on every distinct file, in a thread pool, reporting progress on large sets.

    Args:
        samples: Samples or paths.
        fn: Called with each path; returns anything (default: `image_info`). It reports a file
            that cannot be used by raising `ImageError`; any other exception is a bug and
            propagates.
        workers: Threads (default: `default_workers()`). Pillow and NumPy release the GIL while
            decoding, so threads use several cores.
        progress: Report progress (`imgclf.progress`); None: for more than 200 files.
        description: What the progress report calls the work.

    Returns:
        {path: fn(path)} for the files that worked, and {path: reason} for those that raised.
    """
    fn = fn or image_info
    paths = list(dict.fromkeys(Path(s.path if isinstance(s, Sample) else s) for s in samples))
    results: dict[Path, object] = {}
    errors: dict[Path, str] = {}

    def one(path: Path) -> tuple[Path, object, str | None]:
        try:
            return path, fn(path), None
        except ImageError as e:
            return path, None, e.reason

    def chunk(part: list[Path]) -> list[tuple[Path, object, str | None]]:
        return [one(path) for path in part]

    show = len(paths) > PROGRESS_THRESHOLD if progress is None else progress
    workers = workers or default_workers()
    # Files go to the threads in chunks: a future per file costs ~50 us of the main thread's
    # time (7 s of a warm 100k-image run, whose per-file work is a dictionary lookup), while
    # chunks small against paths / workers still spread slow decodes over every thread.
    size = max(1, min(SCAN_CHUNK, len(paths) // (8 * workers)))
    parts = [paths[k:k + size] for k in range(0, len(paths), size)]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with progress_task(description, total=len(paths), show=show) as advance:
            for done in pool.map(chunk, parts):
                for path, value, reason in done:
                    if reason is None:
                        results[path] = value
                    else:
                        errors[path] = reason
                advance(len(done))
    finally:
        # On a bug in fn (or Ctrl-C) do not decode the remaining thousands of files first.
        pool.shutdown(wait=True, cancel_futures=True)
    # pool.map yields in input order, so both dicts follow the order of `samples`.
    return results, errors


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class FileIssue:
    """A file that cannot be used, and why."""

    path: str
    reason: str


@dataclass
class DuplicateSet:
    """Files with identical content.

    Attributes:
        digest: Their content hash.
        files: Paths as shown to the user (relative to the data root).
        splits: The split of each file.
        labels: The labels of each file.
    """

    digest: str
    files: list[str]
    splits: list[str]
    labels: list[list[str]]

    @property
    def conflicting(self) -> bool:
        """The copies carry different labels."""
        return len({tuple(lab) for lab in self.labels}) > 1

    def example(self) -> str:
        """The first two files, for a one-line message."""
        return " = ".join(self.files[:2]) + (f" (+{len(self.files) - 2} more)" if len(self.files) > 2 else "")


def _hash_or_none(path: Path) -> int | None:
    try:
        return perceptual_hash(path)
    except Exception:  # noqa: BLE001 - whether a file is usable is decided by the decode check
        return None


@dataclass
class NearDuplicate:
    """A validation or test image that looks nearly identical to a training image.

    Attributes:
        train: The training file, as shown to the user.
        other: The validation or test file.
        split: The split of `other`.
        distance: Bits (of 64) by which their perceptual hashes differ.
        labels: Labels of `train` and of `other`.
        similarity: Correlation of their fine structure (`pixel_similarity`), which confirmed
            the hash match.
    """

    train: str
    other: str
    split: str
    distance: int
    labels: list[list[str]]
    similarity: float = 1.0


@dataclass
class CheckReport:
    """What the checks found; saved as JSON in the run directory.

    Attributes:
        checked: Number of files opened.
        unusable: Files dropped because they cannot be decoded.
        source_skipped: Files the source found but could not use (not images, missing, ...).
        conversions: Number of files per conversion to RGB ("grayscale", "CMYK", ...).
        rotated: Files turned upright by their EXIF orientation.
        animated: Animations of which the first frame is used.
        leakage: Identical files in training and in validation or test.
        duplicates: Other identical files (within a split, or across validation and test).
        label_conflicts: Identical files with different labels (also listed above).
        near_duplicates: Validation/test images nearly identical to a training image but not
            the same file (closest first): perceptual hashes within NEAR_DUPLICATE_BITS,
            confirmed by their fine structure.
        near_duplicate_candidates: Hash matches examined (confirmed or not).
        classes_without_valid: Classes with training images but no validation image.
        classes_without_train: Classes listed by the source with no usable training image.
    """

    checked: int = 0
    unusable: list[FileIssue] = field(default_factory=list)
    source_skipped: list[FileIssue] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)
    rotated: int = 0
    animated: int = 0
    leakage: list[DuplicateSet] = field(default_factory=list)
    duplicates: list[DuplicateSet] = field(default_factory=list)
    label_conflicts: list[DuplicateSet] = field(default_factory=list)
    near_duplicates: list[NearDuplicate] = field(default_factory=list)
    near_duplicate_candidates: int = 0
    classes_without_valid: list[str] = field(default_factory=list)
    classes_without_train: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return asdict(self)

    def to_json(self) -> str:
        """The report as JSON text (ASCII-escaped, so any file name can be written)."""
        return json.dumps(self.to_dict(), indent=2)

    def lines(self) -> list[str]:
        """Human-readable findings, most important first; empty when there is nothing to say."""
        out = []
        if self.leakage:
            n = sum(sum(s != TRAIN for s in d.splits) for d in self.leakage)
            out.append(f"LEAKAGE: {n} validation/test files are identical to training files "
                       f"(e.g. {self.leakage[0].example()}): scores will be optimistic; remove the copies")
        if self.near_duplicates:
            d = self.near_duplicates[0]
            n = len({x.other for x in self.near_duplicates})
            out.append(f"LEAKAGE: {n} validation/test images look nearly identical to training images "
                       f"(e.g. {d.train} ~ {d.other}: perceptual hashes {d.distance} of 64 bits "
                       f"apart, fine structure {d.similarity:.2f} correlated): "
                       "copies, or the same scene photographed again; scores will be optimistic; remove them "
                       "or group them (--group-col/--group-pattern)")
        if self.label_conflicts:
            d = self.label_conflicts[0]
            labels = " vs ".join("/".join(lab) or "(none)" for lab in d.labels[:2])
            out.append(f"{len(self.label_conflicts)} sets of identical files carry different labels "
                       f"(e.g. {d.example()}: {labels}): fix the labels")
        if self.classes_without_valid:
            out.append(f"no validation images for class(es) {_names(self.classes_without_valid)}: "
                       "their validation scores cannot be measured")
        if self.unusable:
            out.append(f"{len(self.unusable)} files cannot be used and are skipped "
                       f"(e.g. {self.unusable[0].path}: {self.unusable[0].reason})")
        if self.source_skipped:
            out.append(f"{len(self.source_skipped)} files found by the source are skipped "
                       f"(e.g. {self.source_skipped[0].path}: {self.source_skipped[0].reason})")
        if self.duplicates:
            n = sum(len(d.files) - 1 for d in self.duplicates)
            out.append(f"{n} duplicate files (e.g. {self.duplicates[0].example()}): they count more than once")
        if self.conversions:
            by_count = sorted(self.conversions.items(), key=lambda kv: (-kv[1], kv[0]))
            parts = ", ".join(f"{n} {kind}" for kind, n in by_count)
            out.append(f"converted to RGB: {parts}")
        if self.rotated:
            out.append(f"{self.rotated} images turned upright by their EXIF orientation")
        if self.animated:
            out.append(f"{self.animated} animated or multi-page images (GIF, PNG, WebP, TIFF): "
                       "the first frame or page is used")
        return out


def check_table(
    table: SampleTable,
    fn: Callable[[Path], object] | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[SampleTable, CheckReport]:
    """Open every image, drop the unusable ones and report conversions, duplicates and leakage.

    Args:
        table: The table a source produced.
        fn: Per-file work as in `scan_images` (default: `file_check`, one pass). Conversions are
            counted when it returns an `ImageInfo`, or an object with an `info` attribute holding
            one. Each file is also hashed for duplicate detection, unless it returns a
            `FileCheck`, whose digest and perceptual hash are used instead.
        workers: Threads (default: `default_workers()`).
        progress: As in `scan_images`.

    Returns:
        The table without unusable samples (they move to `skipped`), and the report.

    Raises:
        DataError: No image is usable, there are no validation images, or a class has no
            training image left.
    """
    fn = fn or file_check
    results, errors = scan_images(table.samples, lambda p: _with_hashes(fn(p), p), workers,
                                  progress)
    show = table.relpath
    report = CheckReport(
        checked=len(results) + len(errors),
        unusable=[FileIssue(display_path(show(p)), why) for p, why in errors.items()],
        source_skipped=[FileIssue(display_path(show(p)), why) for p, why in table.skipped],
    )
    kept = [s for s in table.samples if s.path in results]
    out = table.with_samples(kept)
    out.skipped += list(errors.items())
    _count_conversions(report, [results[p][0] for p in dict.fromkeys(s.path for s in kept)])
    _find_duplicates(report, out, {s.path: results[s.path][1] for s in kept})
    _find_near_duplicates(report, out, {s.path: results[s.path][1:] for s in kept})
    _check_classes(report, out, table)
    return out, report


def _with_hashes(value: object, path: Path) -> tuple[object, str, int | None]:
    """(fn's value, digest, perceptual hash): those of a `FileCheck` (the decode cache's single
    pass computed them), else read from the file."""
    if isinstance(value, FileCheck):
        return value, value.digest, value.phash
    return value, file_digest(path), _hash_or_none(path)


def _info_of(value: object) -> ImageInfo | None:
    if isinstance(value, ImageInfo):
        return value
    info = getattr(value, "info", None)
    return info if isinstance(info, ImageInfo) else None


def _count_conversions(report: CheckReport, values: list[object]) -> None:
    conversions: Counter = Counter()
    for value in values:
        info = _info_of(value)
        if info is None:
            continue
        if info.conversion:
            conversions[info.conversion] += 1
        report.rotated += info.orientation != 1
        report.animated += info.animated
    report.conversions = dict(conversions)


def _find_duplicates(report: CheckReport, table: SampleTable, digests: dict[Path, str]) -> None:
    by_digest: dict[str, list[Sample]] = defaultdict(list)
    for s in table.samples:
        by_digest[digests[s.path]].append(s)
    for digest, group in by_digest.items():
        if len({s.path for s in group}) < 2:
            continue
        dup = DuplicateSet(
            digest,
            [display_path(table.relpath(s.path)) for s in group],
            [s.split for s in group],
            [list(s.labels) for s in group],
        )
        splits = set(dup.splits)
        (report.leakage if TRAIN in splits and splits & {VALID, TEST} else report.duplicates).append(dup)
        if dup.conflicting:
            report.label_conflicts.append(dup)


def _find_near_duplicates(report: CheckReport, table: SampleTable,
                          hashes: dict[Path, tuple[str, int | None]]) -> None:
    """Pairs (training image, validation/test image) that are nearly identical.

    Candidates are pairs whose perceptual hashes differ in at most NEAR_DUPLICATE_BITS bits,
    found exactly without comparing all pairs (`near_pairs`); each is then confirmed by
    comparing the two images' fine structure, since on smooth textures different photos share
    hashes. Identical files are left out (they are reported as leakage already).
    """
    train = [s for s in table.split(TRAIN) if hashes[s.path][1] is not None]
    others = [s for s in table.samples if s.split != TRAIN and hashes[s.path][1] is not None]
    i, j, d = near_pairs(np.array([hashes[s.path][1] for s in train], dtype=np.uint64),
                         np.array([hashes[s.path][1] for s in others], dtype=np.uint64))
    found, candidates = [], 0
    # An image is in many candidate pairs when a data set holds many crops of one photo (7,786
    # pairs among 100k generated images): its thumbnail is decoded once, not once a pair.
    # 4096 thumbnails of 64 x 64 float32 take 64 MB; pairs come sorted by training image.
    thumb = functools.lru_cache(maxsize=NEAR_THUMBS_HELD)(detail)
    for a, b, dist in zip((train[k] for k in i), (others[k] for k in j), d):
        if hashes[a.path][0] == hashes[b.path][0]:
            continue
        candidates += 1
        try:
            similarity = pixel_similarity(a.path, b.path, detail_of=thumb)
        except Exception:  # noqa: BLE001 - an unreadable file is the decode check's business
            continue
        if similarity >= CONFIRM_CORRELATION:
            found.append(NearDuplicate(display_path(table.relpath(a.path)),
                                       display_path(table.relpath(b.path)), b.split, int(dist),
                                       [list(a.labels), list(b.labels)], round(similarity, 4)))
    report.near_duplicate_candidates = candidates
    report.near_duplicates = sorted(found, key=lambda x: (x.distance, x.other, x.train))


def _check_classes(report: CheckReport, table: SampleTable, before: SampleTable) -> None:
    """Fail when the checked table cannot train every class; note classes without validation images."""
    where = display_path(table.root) if table.root else "the data"
    if not table.samples:
        first = report.unusable[0] if report.unusable else None
        detail = f" (e.g. {first.path}: {first.reason})" if first else ""
        raise DataError(f"{where}: none of the {report.checked} images can be used{detail}")
    if not table.split(VALID):
        raise DataError(f"{where}: no usable validation images: add some, or let imgclf split the data at random")
    counts = table.counts()
    train, valid = counts.get(TRAIN, Counter()), counts.get(VALID, Counter())
    report.classes_without_train = [c for c in table.classes if not train[c]]
    report.classes_without_valid = [c for c in table.classes if train[c] and not valid[c]]
    if report.classes_without_train:
        dropped = before.counts().get(TRAIN, Counter()) - train
        lost = sum(dropped[c] for c in report.classes_without_train)
        why = f" ({lost} could not be decoded)" if lost else ""
        raise DataError(
            f"{where}: class(es) {_names(report.classes_without_train)} have no usable training images{why}: "
            "add images of them to the training split, or remove the class"
        )


def _names(classes: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{c}'" for c in classes[:limit])
    return shown + (f" and {len(classes) - limit} more" if len(classes) > limit else "")
