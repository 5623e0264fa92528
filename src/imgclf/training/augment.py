"""Batch-level augmentation: mixup and CutMix with soft targets, for single- and multi-label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imgclf.training.resume import mix_seed


@dataclass
class MixBatch:
    """Mixes each training batch with a shuffled copy of itself.

    Each batch draws one of the enabled methods (mixup or CutMix, with equal odds when both are
    on) and a mixing weight lam ~ Beta(alpha, alpha). Targets become the same convex
    combination: one-hot rows (single-label) or multi-hot rows (multi-label), so single-label
    rows still sum to one and multi-label entries stay in [0, 1].

    Attributes:
        num_classes: Output size.
        multi_label: Targets are multi-hot rows rather than class indices.
        mixup: Beta parameter of mixup (0 disables it).
        cutmix: Beta parameter of CutMix (0 disables it).
        off_epoch: From this epoch of the stage on, batches pass through unmixed (None: never).
        seed: Seed of the generator drawing lam, the method and the boxes.
    """

    num_classes: int
    multi_label: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    off_epoch: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def soft_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Targets as float rows (one-hot, or multi-hot). Label smoothing is the loss's job
        (see imgclf.training.fine_tune.batch_mixer)."""
        if self.multi_label:
            return y.float()
        return torch.nn.functional.one_hot(y.long(), self.num_classes).float()

    @property
    def active(self) -> bool:
        """Whether batches of the current epoch are mixed."""
        return self.enabled and (self.off_epoch is None or self.epoch < self.off_epoch)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 key: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch; `key` (e.g. stage and step) reseeds the draws, so a resumed run mixes
        exactly as the uninterrupted one would have."""
        if not self.active:
            return x, y
        if key is not None:
            self.rng = np.random.default_rng(mix_seed(self.seed, *key))
        methods = [m for m, a in (("mixup", self.mixup), ("cutmix", self.cutmix)) if a > 0]
        method = methods[self.rng.integers(len(methods))]
        alpha = self.mixup if method == "mixup" else self.cutmix
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(len(x))).to(x.device)
        x = x.float()
        if method == "mixup":
            mixed = lam * x + (1 - lam) * x[perm]
        else:
            mixed, lam = _cutmix(x, perm, lam, self.rng)
        t = self.soft_targets(y)
        return mixed, lam * t + (1 - lam) * t[perm]


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float,
            rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste a box of the shuffled batch; lam is corrected to the box's true area."""
    h, w = x.shape[-2:]
    cut = np.sqrt(1 - lam)
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, 1 - (y1 - y0) * (x1 - x0) / (h * w)


@dataclass
class BatchCrop:
    """Random resized crops and flips of a whole batch at once, on whatever device it is on.

    The loader then only stacks presized uint8 squares, and the crop, resize and flip of every
    image run as one `grid_sample` on the device: on a GPU that takes the per-image work off the
    CPU, which otherwise starves it. The draws come from a CPU generator seeded by `key`, so
    they are the same on any device and after a resume.

    Attributes:
        size: Output side.
        seed: The run's seed.
        min_scale: Smallest crop area as a fraction of the image (as `train_transform`).
        ratio: Range of crop aspect ratios.
        flip: Also flip half of the images horizontally.
    """

    size: int
    seed: int = 0
    min_scale: float = 0.35
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, x: torch.Tensor, key: tuple[int, ...] = ()) -> torch.Tensor:
        """uint8 or float [B, 3, P, P] on the 0-255 scale -> float [B, 3, size, size]."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, 17, *key))
        n = len(x)
        area = torch.empty(n).uniform_(self.min_scale, 1.0, generator=g)
        log_r = torch.empty(n).uniform_(float(np.log(self.ratio[0])), float(np.log(self.ratio[1])),
                                        generator=g)
        r = torch.exp(log_r)
        # Width and height as fractions of the image side, clipped to the image.
        w, h = torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if self.flip \
            else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        theta = theta.to(x.device)
        grid = torch.nn.functional.affine_grid(theta, [n, x.shape[1], self.size, self.size],
                                               align_corners=False)
        return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear",
                                               padding_mode="border", align_corners=False)
