"""Finding image files: the one directory walker, shared by the sources, predict, the ONNX
predictor and the mining pool, and the sources' path helpers.

The walk follows symbolically linked folders (a class folder is often a link to where the images
live) and survives link loops, unreadable folders and broken links, recording each file it cannot
use (with the reason) instead of losing it silently; hidden files and operating-system clutter are
left out, and so are FIFOs, devices and sockets, which would block or never end a read.

This module imports no torch: the torch-free ONNX predictor lists its images with it.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.errors import DataError, ImgclfError, display_path

logger = logging.getLogger(__name__)

# Operating-system clutter that is not hidden by a leading dot.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__", "$RECYCLE.BIN"})
# Notes and label files kept beside the images (SOURCE.md, README.txt, labels.csv): never
# meant as images, so not reported as skipped on every run.
_DOC_SUFFIXES = frozenset({".md", ".txt", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml",
                           ".pdf", ".html"})


@dataclass
class ImageFiles:
    """Files found under a folder, and those that cannot be used."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(inputs: list[str | os.PathLike]) -> ImageFiles:
    """The image files named by files, folders and globs, in order, and what was left out.

    A folder is walked recursively (see `_walk`); a file is taken as given, whatever its name,
    unless it is not a regular file (a FIFO or device would block the decoder); a glob adds the
    regular files it matches. Each file left out is logged at debug level, and a non-regular file
    at warning level, since the user named or placed it where images were expected.

    Args:
        inputs: Files, folders and glob patterns.

    Returns:
        The files, and (path, reason) for each file or folder left out.

    Raises:
        ImgclfError: An input is neither an existing path nor a glob matching anything.
    """
    out = ImageFiles()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            walk = _walk(p, set())
            out.files += walk.files
            out.skipped += walk.skipped
        elif p.exists():
            if p.is_file():
                out.files.append(p)
            else:
                out.skipped.append((p, "not a regular file"))
        elif p.is_symlink():
            out.files.append(p)  # a broken link: the decoder reports it with the other errors
        else:
            matches = sorted(glob.glob(os.fspath(item), recursive=True))
            if not matches:
                raise ImgclfError(f"{display_path(item)}: no such file, folder or matching glob")
            out.files += [Path(m) for m in matches if Path(m).is_file()]
    for path, reason in out.skipped:
        level = logging.WARNING if reason == "not a regular file" else logging.DEBUG
        logger.log(level, "%s: skipped (%s)", display_path(path), reason)
    return out


def _walk(folder: Path, visited: set, advance=None) -> ImageFiles:
    """Image files under `folder`, recursively and in sorted order, surviving links and bad folders.

    Args:
        folder: Where to start.
        visited: (device, inode) of folders already walked; a symbolic link back to one of them
            (a loop, or a second path to the same images) is not followed again. Updated in place.
        advance: Called with the number of files found in each folder (a progress report).
    """
    out = ImageFiles()
    visited.add(_dir_key(folder))
    stack = [folder]
    while stack:
        current = stack.pop()
        subfolders, before = [], len(out.files)
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
        if advance is not None:
            advance(len(out.files) - before)
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
    return (name.startswith(".") or name in _JUNK_NAMES
            or os.path.splitext(name)[1].lower() in _DOC_SUFFIXES)


def _not_image_reason(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix in (".heic", ".heif"):
        return "HEIC/HEIF photos are not supported: convert them to JPEG"
    return f"not an image file ({display_path(suffix) if suffix else 'no extension'})"


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
