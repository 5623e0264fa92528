"""Decode cache: every image decoded and presized once, reused by every epoch, run and command.

Entries are uint8 [3, P, P] arrays in `<cache>/decoded/<P>-<interpolation>/<digest>.npy`, keyed by
the file's content hash, so an edited image gets a new entry and an unchanged one is never decoded
again. Within a process the images of a data set are stacked in memory when they fit the budget,
else read back from the per-image files on demand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.io import atomic_write
from imgclf.data.images import ImageInfo, file_digest, open_rgb_with_info
from imgclf.data.transforms import Preprocess
from imgclf.data.validate import scan_images

MEMORY_BUDGET_BYTES = 4 * 1024**3


def default_cache_dir() -> Path:
    """`$IMGCLF_CACHE_DIR`, else `$XDG_CACHE_HOME/imgclf`, else `~/.cache/imgclf`."""
    if os.environ.get("IMGCLF_CACHE_DIR"):
        return Path(os.environ["IMGCLF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgclf"


def entry_folder(cache_dir: Path, pre: Preprocess) -> Path:
    suffix = "" if pre.resize == "crop" else f"-{pre.resize}"
    return Path(cache_dir) / "decoded" / f"{pre.presize}-{pre.interpolation}{suffix}"


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
    files: list[Path] | None = None

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


def decode_one(
    path: Path, pre: Preprocess, cache_dir: Path | None, keep: bool = True
) -> tuple[str, np.ndarray | None, ImageInfo | None]:
    """Presized pixels of one file: (digest, array or None unless `keep`, what the file held).

    The ImageInfo is None for cache hits: those files were inspected when first decoded.

    Raises:
        ImageError: The file cannot be used as an image.
    """
    digest = file_digest(path)
    entry = entry_folder(cache_dir, pre) / digest[:2] / f"{digest}.npy" if cache_dir else None
    if entry is not None and entry.is_file():
        if not keep:
            return digest, None, None
        try:
            arr = np.load(entry)
            if arr.shape == (3, pre.presize, pre.presize) and arr.dtype == np.uint8:
                return digest, arr, None
        except (OSError, ValueError):
            pass  # A damaged entry is rebuilt below.
    img, info = open_rgb_with_info(path)
    arr = pre.presize_image(img)
    if entry is not None:
        try:
            atomic_write(entry, lambda f: np.save(f, arr))
        except OSError:
            if not keep:
                raise
    return digest, arr if keep else None, info


def decode_all(
    paths: list[Path],
    pre: Preprocess,
    cache_dir: Path | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    progress: bool = True,
) -> tuple[DecodedImages, dict[Path, str], dict[Path, str]]:
    """Decode (or fetch from the cache) every file once.

    Returns:
        The usable images, {path: reason} for files that could not be decoded, and
        {path: ImageInfo} for files decoded in this call (cache hits are not re-inspected).
    """
    # Large sets stream through the disk cache so memory stays bounded whatever their size.
    keep = cache_dir is None or len(paths) * 3 * pre.presize**2 <= memory_budget
    results, errors = scan_images(
        paths, fn=lambda p: decode_one(Path(p), pre, cache_dir, keep), progress=progress,
        description="Decoding images",
    )
    good = [Path(p) for p in paths if Path(p) in results]
    digests = [results[p][0] for p in good]
    infos = {p: results[p][2] for p in good if results[p][2] is not None}
    if keep:
        array = np.stack([results[p][1] for p in good]) if good else np.zeros(
            (0, 3, pre.presize, pre.presize), np.uint8)
        return DecodedImages(good, digests, array), errors, infos
    files = [entry_folder(cache_dir, pre) / d[:2] / f"{d}.npy" for d in digests]
    return DecodedImages(good, digests, None, files), errors, infos
