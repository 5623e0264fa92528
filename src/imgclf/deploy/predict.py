"""Prediction with a bundle: exactly the preprocessing validation used, optional TTA."""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.data.cache import DecodedImages, decode_all, default_cache_dir
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.presize import zoom_center
from imgclf.data.transforms import Preprocess, center_crop, normalize
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_text

CHUNK_FILES = 1024


def expand_paths(inputs: list[str | Path]) -> list[Path]:
    """Files, folders (searched recursively for images, hidden entries skipped) and globs."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [Path(root) / f for f in sorted(files)
                        if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                raise ImgclfError(f"{item}: no such file, folder or matching glob")
            out += [Path(m) for m in matches if Path(m).is_file()]
    return out


def tta_views(x: torch.Tensor, size: int, n: int) -> list[torch.Tensor]:
    """The plain center view plus `n` deterministic augmented views of presized uint8 images.

    The augmented views cycle through: horizontal flip, the center zoomed in (the central 7/8
    upsampled, the scale random resized crops train at) and its flip, then the four corner
    crops and their flips, so every view is a plausible training crop and the set is the same
    on every call. Measured on from-scratch Imagenette models, plain + flip + zoom + zoom-flip
    (`--tta 3`) gained 1.3 to 2.8 points over the plain view, where plain + flip alone gained
    nothing.
    """
    h, w = x.shape[-2:]
    plain = center_crop(x, size)
    views = [plain]
    extra: list[torch.Tensor] = [plain.flip(-1)]
    if n > 1:
        zoom = torch.from_numpy(zoom_center(x.cpu().numpy(), size)).to(x.device)
        extra += [zoom, zoom.flip(-1)]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    for top, left in corners:
        crop = x[..., top : top + size, left : left + size]
        extra += [crop, crop.flip(-1)]
    return views + extra[:n]


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
        batch = torch.from_numpy(np.stack([images.get(i) for i in range(start, stop)]))
        views = tta_views(batch, pre.size, tta)
        probs = []
        if plain_probs is not None:
            probs.append(torch.from_numpy(np.asarray(plain_probs[start:stop], np.float32)))
            views = views[1:]
        for view in views:
            x = normalize(view.to(device), pre.mean, pre.std).contiguous(
                memory_format=torch.channels_last)
            logits = model(x).float()
            p = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
            probs.append(p.cpu())
        stacked = torch.stack(probs)
        p = stacked.max(0).values if reduce == "max" else stacked.mean(0)
        if reduce == "max" and not multi_label:
            p = p / p.sum(-1, keepdim=True)
        out.append(p.numpy())
    c = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, c), np.float32)


@dataclass
class PredictionResult:
    """Predictions for a list of files.

    Attributes:
        paths: Files that were predicted.
        probs: [N, C] probabilities.
        classes: Class names.
        multi_label: Whether `thresholds` decide the labels.
        thresholds: Per-class thresholds applied (multi-label).
        errors: Files that could not be read, with the reason.
    """

    paths: list[Path]
    probs: np.ndarray
    classes: list[str]
    multi_label: bool
    thresholds: np.ndarray | None = None
    errors: dict[Path, str] = field(default_factory=dict)

    def labels(self) -> list[list[str]]:
        """Decided labels per image: the top class, or every class over its threshold."""
        if self.multi_label:
            return [[c for c, p, t in zip(self.classes, row, self.thresholds) if p >= t]
                    for row in self.probs]
        return [[self.classes[int(np.argmax(row))]] for row in self.probs]

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Up to k (class, probability) pairs per image, most probable first."""
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(self.probs[i, j])) for j in row]
                for i, row in enumerate(order)]

    def to_csv(self, path: str | Path) -> None:
        """path, predicted label(s), a probability column per class."""
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "predicted"] + [f"prob_{c}" for c in self.classes])
        for p, labs, row in zip(self.paths, self.labels(), self.probs):
            w.writerow([os.fsdecode(p).encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                        " ".join(labs)] + [f"{v:.6f}" for v in row])
        atomic_write_text(path, buf.getvalue())


def predict_files(bundle, paths, batch_size: int = 32, tta: int | None = None, top_k: int = 5,
                  threshold: float | None = None, cache_dir: Path | None = None,
                  progress: bool = False, tta_reduce: str | None = None) -> PredictionResult:
    """Decode, presize and predict files with a bundle.

    Args:
        bundle: A loaded `imgclf.deploy.bundle.Bundle`.
        paths: Files, folders or globs.
        batch_size: Images per forward pass.
        tta: Augmented views to add (None: the bundle's setting, else 0).
        top_k: Unused here; kept for symmetry with the CLI.
        threshold: Override the bundle's multi-label thresholds.
        cache_dir: Decode cache folder (None: no disk cache for prediction).
        progress: Show a progress bar while decoding.
        tta_reduce: "mean" or "max" over TTA views (None: the bundle's setting, else mean).
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ImgclfError(f"--threshold {threshold:g} is not a probability: pass a number "
                          "from 0 to 1")
    files = expand_paths(list(paths) if not isinstance(paths, (str, Path)) else [paths])
    n, reduce = bundle.tta_setting(tta, tta_reduce)
    kept: list[Path] = []
    errors: dict[Path, str] = {}
    chunks: list[np.ndarray] = []
    # Files are decoded and scored a chunk at a time, so memory stays bounded for any count.
    for start in range(0, len(files), CHUNK_FILES):
        images, errs, _ = decode_all(files[start:start + CHUNK_FILES], bundle.preprocess,
                                     cache_dir, progress=progress)
        errors.update(errs)
        kept += images.paths
        chunks.append(predict_images(bundle.model, bundle.preprocess, images, bundle.multi_label,
                                     batch_size=batch_size, tta=n, reduce=reduce))
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
