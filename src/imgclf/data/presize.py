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
