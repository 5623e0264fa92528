"""The checks' index: what decoding each file found, kept so a second run decodes nothing.

One SQLite file per cache folder (`<cache>/files.sqlite`) holds, per image file, its absolute
path, size and modification time (the key: a file that changed in any of them is checked
again), its content digest, its perceptual hash and what it held before conversion to RGB
(`ImageInfo`). A warm run reads this back instead of opening the images, so the data summary
(conversions, rotations, duplicates, near-duplicates) is the same whether the cache is cold or
warm. Unusable files are not recorded: they are few, and are tried again each run.

SQLite, not one JSON per data root: one file for every data root, looked up and updated by key
(a million rows in tens of MB), safe when several processes (DDP ranks) write at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imgclf.data.images import ImageInfo

log = logging.getLogger(__name__)

INDEX_NAME = "files.sqlite"
_COLUMNS = ("path", "size", "mtime_ns", "digest", "phash", "format", "mode", "width", "height",
            "animated", "orientation", "transparency")
RACY_SECONDS = 2
_LOOKUP_CHUNK = 500  # below SQLite's limit on bound parameters


@dataclass(frozen=True)
class FileCheck:
    """What one pass over a file found: the checks' inputs for that file.

    Attributes:
        info: What the file held before conversion to RGB.
        digest: Content hash (`imgclf.data.images.file_digest`).
        phash: 64-bit perceptual hash, or None for an image without structure.
        size: File size in bytes when it was read.
        mtime_ns: Modification time when it was read.
    """

    info: ImageInfo
    digest: str
    phash: int | None
    size: int = -1
    mtime_ns: int = -1


def index_key(path: str | os.PathLike) -> bytes:
    """A file's key: its absolute path as bytes (file names need not be valid UTF-8)."""
    return os.fsencode(os.path.abspath(path))


def _connect(cache_dir: Path) -> sqlite3.Connection:
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(Path(cache_dir) / INDEX_NAME, timeout=60)
    con.execute("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, "
                "mtime_ns INTEGER, digest TEXT, phash TEXT, format TEXT, mode TEXT, "
                "width INTEGER, height INTEGER, animated INTEGER, orientation INTEGER, "
                "transparency INTEGER)")
    return con


def lookup(cache_dir: Path, paths: Iterable[str | os.PathLike]) -> dict[bytes, FileCheck]:
    """The recorded checks of `paths`, by `index_key`; {} when there is no usable index.

    The caller compares size and mtime with the file's current ones before trusting a row.
    """
    if not (Path(cache_dir) / INDEX_NAME).is_file():
        return {}
    keys = [index_key(p) for p in paths]
    out: dict[bytes, FileCheck] = {}
    try:
        con = _connect(cache_dir)
        try:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                part = keys[start:start + _LOOKUP_CHUNK]
                rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE path IN "
                                   f"({', '.join('?' * len(part))})", part)
                for row in rows:
                    out[bytes(row[0])] = _from_row(row)
        finally:
            con.close()
    except (sqlite3.Error, OSError, ValueError) as e:
        log.debug("decode cache index unreadable (%s): checking every file", e)
        return {}
    return out


def count(cache_dir: Path) -> int:
    """Files the index records (0 without a readable index)."""
    try:
        con = _connect(cache_dir)
        try:
            return int(con.execute("SELECT COUNT(*) FROM files").fetchone()[0])
        finally:
            con.close()
    except (sqlite3.Error, OSError):
        return 0


def store(cache_dir: Path, checks: dict[str | os.PathLike, FileCheck]) -> None:
    """Record the checks of files just decoded (an index that cannot be written is skipped:
    the next run then decodes again, nothing is lost).

    A file modified less than RACY_SECONDS ago is not recorded: a second edit within the
    file system's timestamp granularity (2 s on FAT) would keep the same size and mtime and
    be mistaken for the file checked here (git's "racy" entries, handled the same way).
    """
    racy = time.time_ns() - RACY_SECONDS * 10**9
    rows = [(index_key(p), c.size, c.mtime_ns, c.digest,
             None if c.phash is None else f"{c.phash:016x}", c.info.format, c.info.mode,
             c.info.size[0], c.info.size[1], int(c.info.animated), c.info.orientation,
             int(c.info.transparency)) for p, c in checks.items() if c.mtime_ns < racy]
    if not rows:
        return
    try:
        con = _connect(cache_dir)
        try:
            with con:
                con.executemany(f"INSERT OR REPLACE INTO files ({', '.join(_COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(_COLUMNS))})", rows)
        finally:
            con.close()
    except (sqlite3.Error, OSError) as e:
        log.warning("could not update the decode cache index in %s (%s): the next run checks "
                    "the files again", cache_dir, e)


def _from_row(row: tuple) -> FileCheck:
    (_, size, mtime_ns, digest, phash, fmt, mode, width, height, animated, orientation,
     transparency) = row
    info = ImageInfo(fmt, mode, (int(width), int(height)), bool(animated), int(orientation),
                     bool(transparency))
    return FileCheck(info, digest, None if phash is None else int(phash, 16), int(size),
                     int(mtime_ns))
