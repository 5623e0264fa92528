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


RESIZE_METHODS = ("auto", "crop", "squish")

# "auto" crops an image no further from square than this and squishes a longer one: photos
# (4:3, 3:2) keep the classic centre crop, while a strip of 105 x 285 px (a surface defect, a
# panorama, a line of text) would lose almost two thirds of itself to it.
MAX_CROP_ASPECT = 1.5


def presize_image(img: Image.Image, presize: int, interpolation: str = "bicubic",
                  resize: str = "crop") -> np.ndarray:
    """The presized uint8 square [3, P, P] of an image.

    Args:
        img: Decoded image (any mode; converted to RGB).
        presize: Side of the square.
        interpolation: Pillow filter name.
        resize: "crop": resize the short side to `presize` and take the centre square;
            "squish": resize the whole image to the square, ignoring its aspect ratio;
            "auto": "crop" up to an aspect ratio of MAX_CROP_ASPECT, "squish" beyond it.
    """
    w, h = img.size
    if resize == "auto":
        resize = "crop" if max(w, h) <= MAX_CROP_ASPECT * min(w, h) else "squish"
    if resize == "squish":
        if (w, h) != (presize, presize):
            img = img.resize((presize, presize), PIL_INTERPOLATION[interpolation],
                             reducing_gap=None)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
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
