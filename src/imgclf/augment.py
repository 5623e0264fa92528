"""Batch-level augmentation: mixup and CutMix with soft targets, for single- and multi-label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixBatch:
    """Mixes each training batch with a shuffled copy of itself.

    Each batch draws one of the enabled methods (mixup or CutMix, with equal odds when both are
    on) and a mixing weight lam ~ Beta(alpha, alpha). Targets become the same convex
    combination: one-hot rows (single-label, label smoothing applied first) or multi-hot rows
    (multi-label), so single-label rows still sum to one and multi-label entries stay in [0, 1].

    Attributes:
        num_classes: Output size.
        multi_label: Targets are multi-hot rows rather than class indices.
        mixup: Beta parameter of mixup (0 disables it).
        cutmix: Beta parameter of CutMix (0 disables it).
        label_smoothing: Smoothing applied to one-hot targets before mixing (single-label).
        off_epoch: From this epoch of the stage on, batches pass through unmixed (None: never).
        seed: Seed of the generator drawing lam, the method and the boxes.
    """

    num_classes: int
    multi_label: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    off_epoch: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def soft_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Targets as float rows (one-hot with smoothing, or multi-hot)."""
        if self.multi_label:
            return y.float()
        onehot = torch.nn.functional.one_hot(y.long(), self.num_classes).float()
        if self.label_smoothing:
            onehot = onehot * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return onehot

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
            from imgclf.resume import mix_seed

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
