"""Preprocessing shared by training, evaluation, prediction and export.

Every image is decoded once and *presized*: its short side resized to `presize` with Pillow, then
center-cropped to a `presize` square of uint8 pixels. Training takes random resized crops and flips
of that square at `size`; evaluation and prediction take its center `size` crop. Because `predict`
calls exactly these functions, a bundle predicts what validation measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from imgclf.data.presize import PIL_INTERPOLATION, check_preprocess, presize_image  # noqa: F401 (re-exported)



@dataclass(frozen=True)
class Preprocess:
    """How pixels become model input. Stored in every bundle's model.json.

    Attributes:
        size: Side of the square crop the model sees.
        presize: Side of the square each image is decoded to once (>= size).
        interpolation: Pillow filter used for the presize resize.
        mean: Per-channel mean on the 0-1 scale.
        std: Per-channel standard deviation on the 0-1 scale.
        resize: How an image becomes the presize square: "crop", "squish" or "auto" (see
            `imgclf.data.presize.presize_image`). Bundles from before this field crop.
    """

    size: int
    presize: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "crop"

    @classmethod
    def from_model_cfg(
        cls, cfg: dict, size: int | None = None, crop_pct: float | None = None,
        resize: str = "crop",
    ) -> "Preprocess":
        """Preprocessing from a timm pretrained config, optionally at another crop size."""
        size = int(size or cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(crop_pct or cfg.get("crop_pct") or 0.875)
        interp = cfg.get("interpolation") or "bicubic"
        if interp not in PIL_INTERPOLATION:
            interp = "bicubic"
        return cls(
            size=size,
            presize=presize_for(size, crop_pct),
            interpolation=interp,
            mean=tuple(float(v) for v in cfg.get("mean", cls.mean)),
            std=tuple(float(v) for v in cfg.get("std", cls.std)),
            resize=resize,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The settings of a model.json; ValueError naming the field if they cannot be used."""
        check_preprocess(d)
        return cls(
            size=int(d["size"]),
            presize=int(d["presize"]),
            interpolation=str(d.get("interpolation", "bicubic")),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=str(d.get("resize", "crop")),
        )

    def presize_image(self, img) -> np.ndarray:
        """A decoded PIL image as this preprocessing's presized uint8 square [3, P, P]."""
        return presize_image(img, self.presize, self.interpolation, self.resize)


def presize_for(size: int, crop_pct: float = 0.875) -> int:
    """The presize that makes a center `size` crop cover `crop_pct` of the image side."""
    return max(size, int(math.floor(size / crop_pct)))


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` square of a [..., H, W] tensor (same offsets as the ONNX predictor)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 normalised with `mean`/`std` given on the 0-1 scale."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    return (x.float() - m) / s


def train_transform(size: int, min_scale: float = 0.35, flip: bool = True) -> v2.Transform:
    """Random resized crop (fastai-style scale range) and horizontal flip on uint8 tensors."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int):
    """The deterministic view used for validation and prediction."""
    return lambda x: center_crop(x, size)


def image_stats(images: np.ndarray | list[np.ndarray], max_images: int = 500,
                seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of a seeded sample of presized uint8 images."""
    n = len(images)
    idx = np.random.default_rng(seed).permutation(n)[:max_images]
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in idx:
        a = np.asarray(images[int(i)], dtype=np.float64).reshape(3, -1) / 255.0
        total += a.sum(1)
        total_sq += (a**2).sum(1)
        count += a.shape[1]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resized_eval_transform(size: int, presize: int, crop_pct: float):
    """Validation view at a smaller stage size (progressive resizing): the same field of view as
    the final size, at lower resolution."""
    if size >= presize:
        return lambda x: center_crop(x, size)
    inner = max(size, int(round(size / crop_pct)))
    resize = v2.Resize(inner, antialias=True)
    return lambda x: center_crop(resize(x), size)
