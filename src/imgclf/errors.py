"""User-facing errors: the command line prints `str(error)` as one line, without a traceback.

Anything a user can fix (a missing folder, a broken image, a bad CSV column) raises a subclass of
`ImgclfError` whose message names the file and the fix. Other exceptions are bugs.
"""

from __future__ import annotations

import os
from pathlib import Path


def display_path(path: str | bytes | os.PathLike | None) -> str:
    """A file name that can always be printed and written as UTF-8.

    File names that are not valid UTF-8 arrive as surrogate-escaped strings; printing those raises
    UnicodeEncodeError, so their undecodable bytes are shown as `\\xNN` escapes instead.
    """
    if path is None:
        return "<image bytes>"
    try:
        raw = os.fsencode(path)
    except (TypeError, UnicodeError):
        return repr(path)
    return raw.decode("utf-8", "backslashreplace")


class ImgclfError(Exception):
    """Base class of errors the user can fix; `str(e)` is a complete one-line message."""


class DataError(ImgclfError):
    """The data set as a whole cannot be used (missing folder, too few classes, bad CSV, ...)."""


class ImageError(ImgclfError):
    """One file cannot be used as an image.

    Attributes:
        path: The file (None for in-memory bytes without a name).
        reason: What is wrong and how to fix it, without the file name.
    """

    def __init__(self, path: str | bytes | os.PathLike | None, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else path
        self.reason = reason

    def __str__(self) -> str:
        return f"{display_path(self.path)}: {self.reason}"
