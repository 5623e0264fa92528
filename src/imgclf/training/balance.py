"""Class imbalance: per-class loss weights, a class-balanced sampler, and which of them to use.

Modes (`--balance`):
    none     plain loss and uniform shuffling.
    weights  the loss weights each class by the inverse of its training frequency, so every
             class contributes equally to the loss (multi-label: BCE `pos_weight` = negatives /
             positives per class).
    sampler  training batches are drawn with replacement so every class is equally likely
             (seeded); the frozen-head stage, which trains on cached features, uses the loss
             weights instead, since it passes over those features many times per epoch anyway.
    auto     `AUTO_MODE` when the largest training class is more than `AUTO_RATIO` times the
             smallest (single-label), otherwise none. Multi-label data stays at none: its
             per-class decision thresholds are tuned on validation, which already counters
             skewed label frequencies.

`benchmarks/imbalance_and_label_errors.py` measures the modes; the README records the result.
"""

from __future__ import annotations

import torch
from torch.utils.data import WeightedRandomSampler

from imgclf.config import BALANCE_MODES as MODES  # declared with the option
from imgclf.errors import ImgclfError

AUTO_RATIO = 3.0  # the data summary flags imbalance above the same ratio
AUTO_MODE = "weights"


def resolve(mode: str, imbalance_ratio: float | None, multi_label: bool = False) -> str:
    """The mode to train with: `mode` itself, or what "auto" picks for this data.

    Args:
        mode: One of `MODES`.
        imbalance_ratio: Largest over smallest training class count (None if unknown).
        multi_label: Whether the task is multi-label.

    Raises:
        ImgclfError: `mode` is not one of `MODES`.
    """
    if mode not in MODES:
        raise ImgclfError(f"--balance must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    if multi_label or imbalance_ratio is None or imbalance_ratio <= AUTO_RATIO:
        return "none"
    return AUTO_MODE


def describe(requested: str, mode: str, imbalance_ratio: float | None, multi_label: bool = False) -> str:
    """One line for the data summary saying what imgclf does about imbalance, and why."""
    what = {
        "none": "no rebalancing",
        "weights": "loss weighted by inverse class frequency",
        "sampler": "class-balanced sampling of training batches (frozen stage: loss weights)",
    }[mode]
    if requested != "auto":
        return f"imbalance handling: {what} (--balance {mode})"
    if mode == "none":
        why = ("multi-label: per-class thresholds are tuned instead" if multi_label and
               imbalance_ratio is not None and imbalance_ratio > AUTO_RATIO
               else f"ratio <= {AUTO_RATIO:g}")
        return f"imbalance handling: {what} ({why}; --balance weights or sampler to change)"
    return (f"imbalance handling: {what} (auto, ratio > {AUTO_RATIO:g}; "
            "--balance none to turn it off)")


def class_counts(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Training images per class: from class indices [N] or multi-hot rows [N, C]."""
    if targets.ndim == 2:
        return targets.float().sum(0)
    return torch.bincount(targets.long(), minlength=n_classes).float()


def class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class loss weights that make every class weigh the same in the loss.

    Single-label: N / (C * n_c), scikit-learn's "balanced" weights (a class without training
    images gets 1; it never occurs in the loss). Multi-label: `pos_weight` n_neg / n_pos per
    class for the BCE (1 for a class without positives).

    Args:
        targets: Training targets, class indices [N] or multi-hot rows [N, C].
        n_classes: Number of classes C.

    Returns:
        Float tensor [C].
    """
    counts = class_counts(targets, n_classes)
    n = float(len(targets))
    if targets.ndim == 2:
        return torch.where(counts > 0, (n - counts) / counts.clamp(min=1), torch.ones_like(counts))
    present = counts > 0
    w = torch.ones(n_classes)
    w[present] = n / (int(present.sum()) * counts[present])
    return w


def sample_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-image drawing weights under which every class is drawn equally often.

    Single-label: 1 / n_c of the image's class. Multi-label: the mean of 1 / n_c over the
    image's labels, and the mean weight for images without labels (balanced exactly only when
    every image has one label; rare labels are still drawn much more often than uniformly).
    """
    counts = class_counts(targets, n_classes).clamp(min=1)
    if targets.ndim == 1:
        return 1.0 / counts[targets.long()]
    y = targets.float()
    n_labels = y.sum(1)
    w = (y / counts).sum(1) / n_labels.clamp(min=1)
    if (n_labels == 0).any():
        w[n_labels == 0] = w[n_labels > 0].mean() if (n_labels > 0).any() else 1.0
    return w


def balanced_sampler(targets: torch.Tensor, n_classes: int, seed: int,
                     num_samples: int | None = None) -> WeightedRandomSampler:
    """A seeded sampler drawing `num_samples` (default: N) images per epoch with replacement.

    Each epoch draws afresh from the same seeded generator, so runs repeat exactly while epochs
    differ. Small classes are repeated (augmentation makes the copies differ) and large classes
    subsampled, so an epoch has the same number of steps as without the sampler.
    """
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(sample_weights(targets, n_classes).double(),
                                 num_samples or len(targets), replacement=True, generator=g)
