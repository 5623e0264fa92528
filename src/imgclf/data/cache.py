"""Decode cache: every image decoded and presized once, reused by every epoch, run and command.

Entries are uint8 [3, P, P] arrays in `<cache>/decoded/<P>-<interpolation>/<digest>.npy`, keyed by
the file's content hash, so an edited image gets a new entry and an unchanged one is never decoded
again. Within a process the images of a data set are held in one array when they fit the memory
budget, else read back from the per-image files on demand (see `default_memory_budget`).

The memory budget: the squares are held in memory when N * 3 * P * P bytes is at most
min(4 GiB, 25% of the memory available when the run starts) (`$IMGCLF_MEMORY_BUDGET_GB`
overrides it). At presize 256 a square takes 192 KiB, so up to about 21,800 images are held
(at 4 GiB); a larger set streams each square from its cache entry when the loader asks for it,
so its memory does not grow with N: the per-image Python objects are its path, digest and
entry path, a few hundred bytes. The held array is filled in place as files are decoded, never
stacked from a list of copies, so the peak is the budget, not twice it.

One pass per file: it is read once, and its digest, the checks (`ImageInfo`), its perceptual
hash and its presized square all come from those bytes and that one decode. What the checks
found is kept in an index (`imgclf.data.file_index`), so a warm run opens no image at all.

The cache has a size cap (`--cache-max-gb`; default `default_max_bytes`): using an entry
touches its modification time, and after a run that wrote entries the least recently used ones
are deleted until the cache fits (never those the current call uses).

Why raw .npy entries: measured on caltech101_subset (600 JPEGs, presize 256, squish; a shared
2-core machine), per image: decoding and presizing the JPEG itself 1.37 ms; reading the entry
back as .npy 0.11 ms at 192 KiB; zlib-1 0.71x the bytes but 1.11 ms to read (4.2 ms to write);
PNG-1 0.50x and 2.42 ms; lossless WebP 0.36x and 1.68 ms. Every compressed form costs about as
much to read as decoding the photo again, and streamed sets read entries every epoch, so
compression would save disk by giving up what the cache is for.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data import file_index
from imgclf.data.file_index import FileCheck
from imgclf.data.images import bytes_digest, open_rgb_with_info, read_bytes
from imgclf.data.near_duplicates import image_hash
from imgclf.data.transforms import Preprocess
from imgclf.data.validate import scan_images
from imgclf.io import atomic_write

log = logging.getLogger(__name__)

MEMORY_BUDGET_BYTES = 4 * 1024**3  # the budget's ceiling; see default_memory_budget
MEMORY_FRACTION = 0.25
# The default cap: at most this much, and at most this fraction of the disk space the cache
# has (free space plus what it already holds, so the cap does not shrink as the cache fills).
DEFAULT_MAX_BYTES = 20 * 10**9
DEFAULT_DISK_FRACTION = 0.25
ENTRY_SUFFIX = ".npy"


def default_cache_dir() -> Path:
    """`$IMGCLF_CACHE_DIR`, else `$XDG_CACHE_HOME/imgclf`, else `~/.cache/imgclf`."""
    if os.environ.get("IMGCLF_CACHE_DIR"):
        return Path(os.environ["IMGCLF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgclf"


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int:
    """Bytes of presized squares (and of cached features) a run may hold in memory.

    `$IMGCLF_MEMORY_BUDGET_GB` (GB, 10^9 bytes) when set; else min(4 GiB, 25% of the memory
    available now). 4 GiB holds every square of a set up to ~21,800 images at presize 256,
    where holding them saves reading each entry back every epoch (0.11 ms an image); above
    that the reads cost little next to a training step, while holding N squares would let
    memory grow without bound. A quarter of what is available leaves the rest to the model,
    the loader and other processes (DDP ranks each hold their own copy).
    """
    env = os.environ.get("IMGCLF_MEMORY_BUDGET_GB")
    if env:
        try:
            return max(0, int(float(env) * 1e9))
        except ValueError:
            log.warning("IMGCLF_MEMORY_BUDGET_GB=%r is not a number: using the default", env)
    available = _available_memory()
    if available is None:
        return MEMORY_BUDGET_BYTES
    return int(min(MEMORY_BUDGET_BYTES, MEMORY_FRACTION * available))


def gb_to_bytes(gb: float | None) -> int | None:
    """--cache-max-gb (GB, 10^9 bytes) as bytes; None stays None (the default cap)."""
    return None if gb is None else int(float(gb) * 1e9)


def entry_folder(cache_dir: Path, pre: Preprocess) -> Path:
    suffix = "" if pre.resize == "crop" else f"-{pre.resize}"
    return Path(cache_dir) / "decoded" / f"{pre.presize}-{pre.interpolation}{suffix}"


def entry_path(cache_dir: Path, pre: Preprocess, digest: str) -> Path:
    """Where the presized square of the file with content `digest` is kept."""
    return Path(_entry_file(str(entry_folder(cache_dir, pre)), digest))


def _entry_file(folder: str, digest: str) -> str:
    # Strings, not Paths: a warm 100k-image run built 300k Path objects here, about 2 s.
    return os.path.join(folder, digest[:2], digest + ENTRY_SUFFIX)


def default_max_bytes(cache_dir: Path, held: int | None = None) -> int:
    """The cap when none is given: min(20 GB, 25% of free disk space plus the cache's bytes).

    Args:
        cache_dir: The cache folder (or where it will be).
        held: Bytes the cache holds already (default: counted).
    """
    where = Path(cache_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return DEFAULT_MAX_BYTES
    held = cache_info(cache_dir).bytes if held is None else held
    return int(min(DEFAULT_MAX_BYTES, DEFAULT_DISK_FRACTION * (free + held)))


@dataclass
class DecodedImages:
    """Presized uint8 images of a list of files, indexable by position.

    Attributes:
        paths: The image files, in order.
        digests: Content hash of each file.
        array: [N, 3, P, P] uint8 when held in memory, else None.
        files: Per-image cache files used when `array` is None.
    """

    paths: list[Path]
    digests: list[str]
    array: np.ndarray | None
    files: list[Path] | list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> np.ndarray:
        if self.array is not None:
            return self.array[i]
        return np.load(self.files[i])  # type: ignore[index]

    def subset(self, indices: list[int]) -> "DecodedImages":
        """The images at `indices`, in that order (held arrays are indexed, not copied twice)."""
        return DecodedImages(
            paths=[self.paths[i] for i in indices], digests=[self.digests[i] for i in indices],
            array=self.array[indices] if self.array is not None else None,
            files=[self.files[i] for i in indices] if self.files is not None else None)


def _use_entry(entry: Path | str, pre: Preprocess,
               keep: bool) -> tuple[bool, np.ndarray | None]:
    """(usable, pixels if `keep`) of a cache entry, touched as just used (the LRU order)."""
    try:
        os.utime(entry)  # also tells whether it exists, in one call
    except FileNotFoundError:
        return False, None
    except OSError:  # a cache shared read-only: used, just not reordered
        if not os.path.isfile(entry):
            return False, None
    if not keep:
        return True, None
    try:
        arr = np.load(entry)
        if arr.shape == (3, pre.presize, pre.presize) and arr.dtype == np.uint8:
            return True, arr
    except (OSError, ValueError):
        pass  # A damaged entry is rebuilt.
    return False, None


def decode_one(
    path: Path, pre: Preprocess, cache_dir: Path | None, keep: bool = True,
    known: FileCheck | None = None,
) -> tuple[str, np.ndarray | None, FileCheck]:
    """Presized pixels of one file: (digest, array or None unless `keep`, what the checks need).

    The file is read once and decoded at most once. With `known` (its index record) and an
    unchanged size and modification time, a cache entry is used and the file is not opened.

    Raises:
        ImageError: The file cannot be used as an image.
    """
    try:
        st = os.stat(path)
    except OSError:
        read_bytes(path)  # raises the read error with a clear reason
        raise
    if (known is not None and cache_dir is not None and known.size == st.st_size
            and known.mtime_ns == st.st_mtime_ns):
        ok, arr = _use_entry(entry_path(cache_dir, pre, known.digest), pre, keep)
        if ok:
            return known.digest, arr, known
    data = read_bytes(path)
    digest = bytes_digest(data)
    img, info = open_rgb_with_info(data, name=path)
    try:
        phash = image_hash(img)
    except Exception:  # noqa: BLE001 - a picture too odd to hash is still a usable picture
        phash = None
    check = FileCheck(info, digest, phash, st.st_size, st.st_mtime_ns)
    entry = entry_path(cache_dir, pre, digest) if cache_dir is not None else None
    if entry is not None:
        ok, arr = _use_entry(entry, pre, keep)  # the same content under another name
        if ok:
            return digest, arr, check
    arr = pre.presize_image(img)
    if entry is not None:
        try:
            atomic_write(entry, lambda f: np.save(f, arr))
        except OSError:
            if not keep:
                raise
    return digest, arr if keep else None, check


def decode_all(
    paths: list[Path],
    pre: Preprocess,
    cache_dir: Path | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
    max_bytes: int | None = None,
) -> tuple[DecodedImages, dict[Path, str], dict[Path, FileCheck]]:
    """Decode (or fetch from the cache) every file once.

    Args:
        paths: The image files.
        pre: The preprocessing that makes the presized squares.
        cache_dir: The decode cache (None: decode in memory only).
        memory_budget: Sets whose squares take more bytes stream from the disk cache
            (None: `default_memory_budget()`). Without a cache they are held whatever it is.
        progress: Report progress.
        max_bytes: The cache's cap (None: `default_max_bytes`); after writing entries the least
            recently used others are evicted until the cache fits.

    Returns:
        The usable images, {path: reason} for files that could not be decoded, and
        {path: FileCheck} for every usable file (from this pass or from the index).
    """
    start = time.time()
    budget = default_memory_budget() if memory_budget is None else memory_budget
    square = 3 * pre.presize**2
    distinct = list(dict.fromkeys(Path(p) for p in paths))
    # Large sets stream through the disk cache so memory stays bounded whatever their size.
    keep = cache_dir is None or len(distinct) * square <= budget
    if cache_dir is not None and not keep:
        log.info("Decode cache: %d squares take %.2f GB, over the memory budget of %.2f GB: "
                 "read from the cache as the loader asks", len(distinct),
                 len(distinct) * square / 1e9, budget / 1e9)
    slot = {p: i for i, p in enumerate(distinct)}
    # Filled in place as files are decoded: stacking a list of per-image copies would peak
    # at twice the held bytes (4.8 GB RSS for 1.97 GB of squares at 10k images, measured).
    held = np.empty((len(distinct) if keep else 0, 3, pre.presize, pre.presize), np.uint8)
    known = file_index.lookup(cache_dir, distinct) if cache_dir is not None else {}

    def one(path: Path) -> tuple[str, FileCheck]:
        digest, arr, check = decode_one(path, pre, cache_dir, keep,
                                        known.get(file_index.index_key(path)))
        if keep:
            held[slot[path]] = arr
        return digest, check

    results: dict[Path, tuple[str, FileCheck]] = {}
    todo = distinct
    if known and not keep:
        # Streamed and indexed: a file whose size and mtime match its record needs only a
        # stat and its entry touched, cheaper in this thread than handing it to the pool.
        folder, todo = str(entry_folder(cache_dir, pre)), []
        for path in distinct:
            check = known.get(file_index.index_key(path))
            if check is not None and _unchanged(path, check) and _use_entry(
                    _entry_file(folder, check.digest), pre, False)[0]:
                results[path] = (check.digest, check)
            else:
                todo.append(path)
    fresh_results, errors = scan_images(todo, fn=one, progress=progress,
                                        description="Decoding and checking images")
    results.update(fresh_results)
    good = [Path(p) for p in paths if Path(p) in results]
    digests = [results[p][0] for p in good]
    checks = {p: results[p][1] for p in good}
    if cache_dir is not None:
        fresh = {p: c for p, c in checks.items() if known.get(file_index.index_key(p)) is not c}
        file_index.store(cache_dir, fresh)
        if fresh:  # a warm run wrote nothing, so has nothing to evict
            _evict_if_over(cache_dir, max_bytes, len(fresh) * (square + 128), start)
    if keep:
        rows = [slot[p] for p in good]
        # Usually every file decoded, each once: the held array as it is, no copy.
        array = held if rows == list(range(len(held))) else held[rows]
        return DecodedImages(good, digests, array), errors, checks
    folder = str(entry_folder(cache_dir, pre))
    files = [_entry_file(folder, d) for d in digests]
    return DecodedImages(good, digests, None, files), errors, checks


def _unchanged(path: Path, check: FileCheck) -> bool:
    """Whether the file still has the size and modification time its index record has."""
    try:
        st = os.stat(path)
    except OSError:
        return False  # decode_one reports why
    return st.st_size == check.size and st.st_mtime_ns == check.mtime_ns


# ---------------------------------------------------------------------------------------------
# Size cap, info and clearing


@dataclass
class CacheFolder:
    """The entries of one presize setting (`<presize>-<interpolation>[-<resize>]`)."""

    name: str
    entries: int = 0
    bytes: int = 0


@dataclass
class CacheInfo:
    """What the decode cache holds.

    Attributes:
        location: The cache folder.
        entries: Presized images held.
        bytes: Their bytes on disk, plus the index's.
        folders: Per presize setting.
        index_files: Files the checks' index records.
        index_bytes: The index's size.
        max_bytes: The default cap at this location.
    """

    location: str
    entries: int = 0
    bytes: int = 0
    folders: list[CacheFolder] = field(default_factory=list)
    index_files: int = 0
    index_bytes: int = 0
    max_bytes: int = 0


def _entries(cache_dir: Path):
    """(folder name, path, size, mtime) of every entry, folder by folder."""
    root = Path(cache_dir) / "decoded"
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        for sub in sorted(folder.iterdir()):
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for e in it:
                    if e.name.endswith(ENTRY_SUFFIX):
                        try:
                            st = e.stat()
                        except OSError:
                            continue  # evicted by another process meanwhile
                        yield folder.name, e.path, st.st_size, st.st_mtime


def cache_info(cache_dir: Path | None = None, with_max: bool = False) -> CacheInfo:
    """Location, entries and bytes of the decode cache, per presize setting.

    Args:
        cache_dir: The cache folder (default: `default_cache_dir()`).
        with_max: Also compute the default cap at this location.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    info = CacheInfo(str(cache_dir))
    folders: dict[str, CacheFolder] = {}
    for name, _, size, _ in _entries(cache_dir):
        f = folders.setdefault(name, CacheFolder(name))
        f.entries += 1
        f.bytes += size
    info.folders = list(folders.values())
    info.entries = sum(f.entries for f in info.folders)
    index = cache_dir / file_index.INDEX_NAME
    if index.is_file():
        info.index_bytes = index.stat().st_size
        info.index_files = file_index.count(cache_dir)
    info.bytes = sum(f.bytes for f in info.folders) + info.index_bytes
    if with_max:
        info.max_bytes = default_max_bytes(cache_dir, held=info.bytes)
    return info


# Entry bytes per cache folder at its last scan in this process, plus those written since:
# callers that decode in chunks (predict, mining's pool) would otherwise list a cache of a
# million entries once per chunk. Only a trigger: the scan it triggers counts afresh.
_usage: dict[str, int] = {}


def _evict_if_over(cache_dir: Path, max_bytes: int | None, written: int, start: float) -> None:
    key = os.path.abspath(cache_dir)
    if key in _usage:
        _usage[key] += written
        cap = default_max_bytes(cache_dir, held=_usage[key]) if max_bytes is None else max_bytes
        if _usage[key] <= cap:
            return
    evict(cache_dir, max_bytes, protect_since=start)


def evict(cache_dir: Path, max_bytes: int | None = None,
          protect_since: float | None = None) -> tuple[int, int]:
    """Delete least recently used entries until they take at most `max_bytes`.

    The cap bounds the presized images; the checks' index beside them is not evicted (it
    takes about 100 bytes per file, 0.05% of a 224 px model's entry).

    Args:
        cache_dir: The cache folder.
        max_bytes: The cap (None: `default_max_bytes`).
        protect_since: Entries used at or after this time (`time.time()`) are kept whatever
            the cap: the running command reads them.

    Returns:
        (entries deleted, bytes freed).
    """
    found = list(_entries(cache_dir))
    total = sum(f[2] for f in found)
    cap = default_max_bytes(cache_dir, held=total) if max_bytes is None else int(max_bytes)
    _usage[os.path.abspath(cache_dir)] = total
    if total <= cap:
        return 0, 0
    deleted = freed = 0
    for _, path, size, mtime in sorted(found, key=lambda f: f[3]):
        if total - freed <= cap:
            break
        if protect_since is not None and mtime >= protect_since - 1e-3:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        deleted, freed = deleted + 1, freed + size
    _usage[os.path.abspath(cache_dir)] = total - freed
    if total - freed > cap:
        log.warning("The decode cache holds %.2f GB, over its cap of %.2f GB, because this "
                    "run's images alone take that: raise --cache-max-gb", (total - freed) / 1e9,
                    cap / 1e9)
    if deleted:
        log.info("Decode cache: evicted %d least recently used images (%.2f GB) to stay under "
                 "%.2f GB", deleted, freed / 1e9, cap / 1e9)
    return deleted, freed


def clear_cache(cache_dir: Path | None = None) -> CacheInfo:
    """Delete every entry and the index; returns what was there."""
    cache_dir = Path(cache_dir or default_cache_dir())
    before = cache_info(cache_dir)
    _usage.pop(os.path.abspath(cache_dir), None)
    shutil.rmtree(cache_dir / "decoded", ignore_errors=True)
    for suffix in ("", "-journal", "-wal", "-shm"):
        (cache_dir / f"{file_index.INDEX_NAME}{suffix}").unlink(missing_ok=True)
    return before

