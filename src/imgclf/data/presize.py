"""Presizing with Pillow and numpy only, so the torch-free ONNX predictor shares it exactly."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def presize_image(img: Image.Image, presize: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the short side to `presize` and center-crop a square: uint8 array [3, P, P]."""
    w, h = img.size
    scale = presize / min(w, h)
    # Rounding up keeps both sides >= presize so the crop never needs padding.
    nw, nh = max(presize, math.ceil(w * scale - 1e-6)), max(presize, math.ceil(h * scale - 1e-6))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), PIL_INTERPOLATION[interpolation], reducing_gap=None)
    left, top = (nw - presize) // 2, (nh - presize) // 2
    img = img.crop((left, top, left + presize, top + presize))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()


ZOOM_FRACTION = 0.875


def zoom_center(x: np.ndarray, size: int, fraction: float = ZOOM_FRACTION) -> np.ndarray:
    """The central `fraction` of the `size` center view, upsampled back to `size`: uint8.

    A test-time view at the scale training crops show objects at: random resized crops zoom in
    (on average by about 1.2x at fastai's 0.35 minimum scale) while the plain view does not.
    Bilinear with half-pixel centres (as torch's align_corners=False), in numpy so that the
    torch predictor and the torch-free ONNX predictor make byte-identical views.

    Args:
        x: Presized uint8 squares [..., H, W].
        size: Side of the center view (the model's input size).
        fraction: Side of the zoomed crop relative to `size`.
    """
    side = max(1, int(round(size * fraction)))
    h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.asarray(x[..., top : top + side, left : left + side], dtype=np.float32)
    src = np.clip((np.arange(size) + 0.5) * (side / size) - 0.5, 0, side - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, side - 1)
    f = (src - i0).astype(np.float32)
    rows = crop[..., i0, :] * (1 - f)[:, None] + crop[..., i1, :] * f[:, None]
    out = rows[..., i0] * (1 - f) + rows[..., i1] * f
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
