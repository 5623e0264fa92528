"""Prediction with a bundle: exactly the preprocessing validation used, optional TTA."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.allocator import retain_freed_memory
from imgclf.data import presize
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.files import list_images
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.transforms import Preprocess, normalize
from imgclf.deploy.results import PredictionResult
from imgclf.errors import ImgclfError

CHUNK_FILES = 1024
log = logging.getLogger(__name__)


def expand_paths(inputs: list[str | Path]) -> list[Path]:
    """Files, folders (walked by `imgclf.data.files.list_images`) and globs, as image files."""
    return list_images(inputs).files


def tta_views(x: torch.Tensor, size: int, n: int) -> list[torch.Tensor]:
    """`imgclf.data.presize.tta_views` of a uint8 tensor, as tensors on its device."""
    return [torch.from_numpy(v).to(x.device) for v in presize.tta_views(x.cpu().numpy(), size, n)]


@torch.no_grad()
def predict_images(
    model: nn.Module,
    pre: Preprocess,
    images: DecodedImages,
    multi_label: bool,
    batch_size: int = 32,
    tta: int = 0,
    reduce: str = "mean",
    device: str | torch.device = "cpu",
    plain_probs: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities [N, C] in float32, batch by batch (memory bounded by the batch).

    Args:
        plain_probs: The plain view's probabilities [N, C] when they are already known (the
            validation pass of the kept epoch): only the augmented views are then computed.
    """
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        batch = np.stack([images.get(i) for i in range(start, stop)])
        views = presize.tta_views(batch, pre.size, tta)
        probs = []
        if plain_probs is not None:
            probs.append(np.asarray(plain_probs[start:stop], np.float32))
            views = views[1:]
        for view in views:
            x = normalize(torch.from_numpy(view).to(device), pre.mean, pre.std).contiguous(
                memory_format=torch.channels_last)
            logits = model(x).float()
            p = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
            probs.append(p.cpu().numpy())
        out.append(presize.reduce_views(np.stack(probs), reduce, multi_label))
    c = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, c), np.float32)


def predict_files(bundle, paths, batch_size: int = 32, tta: int | None = None,
                  threshold: float | None = None, cache_dir: Path | None = None,
                  progress: bool = False, tta_reduce: str | None = None) -> PredictionResult:
    """Decode, presize and predict files with a bundle.

    Args:
        bundle: A loaded `imgclf.deploy.bundle.Bundle`.
        paths: Files, folders or globs.
        batch_size: Images per forward pass.
        tta: Augmented views to add (None: the bundle's setting, else 0).
        threshold: Override the bundle's multi-label thresholds.
        cache_dir: Decode cache folder (None: no disk cache for prediction).
        progress: Show a progress bar while decoding.
        tta_reduce: "mean" or "max" over TTA views (None: the bundle's setting, else mean).
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ImgclfError(f"--threshold {threshold:g} is not a probability: pass a number "
                          "from 0 to 1")
    found = list_images(list(paths) if not isinstance(paths, (str, Path)) else [paths])
    files = found.files
    n, reduce = bundle.tta_setting(tta, tta_reduce)
    kept: list[Path] = []
    # A file named like an image that the walker could not take (a link loop, a FIFO) is
    # reported with the files that failed to decode; other names were never asked for.
    errors: dict[Path, str] = {p: why for p, why in found.skipped
                               if p.suffix.lower() in IMAGE_EXTENSIONS}
    others = [p for p, _ in found.skipped if p not in errors]
    if others:
        # Said, not silent: a named file is predicted whatever its name, so one in a folder
        # that is not should not vanish without a word.
        log.warning("%d files in the folders given are not named like images and were left out "
                    "(e.g. %s): name them to predict them anyway", len(others), others[0])
    chunks: list[np.ndarray] = []
    # Files are decoded and scored a chunk at a time, so memory stays bounded for any count.
    with retain_freed_memory():  # no fresh pages per batch (imgclf.allocator)
        for start in range(0, len(files), CHUNK_FILES):
            images, errs, _ = decode_all(files[start:start + CHUNK_FILES], bundle.preprocess,
                                         cache_dir, progress=progress)
            errors.update(errs)
            kept += images.paths
            chunks.append(predict_images(bundle.model, bundle.preprocess, images,
                                         bundle.multi_label, batch_size=batch_size, tta=n,
                                         reduce=reduce))
    probs = np.concatenate(chunks) if kept else np.zeros((0, len(bundle.classes)), np.float32)
    return PredictionResult(
        paths=kept, probs=probs, classes=bundle.classes, multi_label=bundle.multi_label,
        thresholds=bundle.decision_thresholds(threshold) if bundle.multi_label else None,
        errors=errors)


def describe_thresholds(bundle, override: float | None = None) -> str:
    """One line saying which multi-label decision thresholds `predict` applies, and from where."""
    if override is not None:
        return f"Threshold {override:g} for every class (--threshold overrides the bundle's)"
    if bundle.thresholds is None:
        return "Threshold 0.5 for every class (the bundle has no tuned thresholds)"
    values = [float(t) for t in bundle.thresholds]
    if len(set(values)) == 1:
        return f"Threshold {values[0]:g} for every class (tuned on validation)"
    per = ", ".join(f"{c} {t:g}" for c, t in zip(bundle.classes, values))
    return f"Per-class thresholds tuned on validation: {per}"
