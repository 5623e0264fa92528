"""Finding image files: the one directory walker the sources share, and their path helpers.

The walk survives symbolic-link loops, unreadable folders and broken links, recording each file
it cannot use (with the reason) instead of losing it silently; hidden files and operating-system
clutter are left out.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.errors import DataError, display_path

# Operating-system clutter that is not hidden by a leading dot.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__", "$RECYCLE.BIN"})


@dataclass
class _Walk:
    """Files found under a folder, and those that cannot be used."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


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
