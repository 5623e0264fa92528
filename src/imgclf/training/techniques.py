"""Which variant of each technique a config asks for, resolved against the model and machine.

Precision, BatchNorm handling, discriminative rates, mixing and where crops run: small pure
decisions the recipe (imgclf.training.fine_tune) takes before it trains.
"""

from __future__ import annotations

import torch
from torch import nn

from imgclf.training import models
from imgclf.training.augment import MixBatch
from imgclf.training.task import Task


def resolve_precision(precision: str, model: nn.Module) -> str:
    """The Lightning precision for "auto": mixed precision on CUDA; on CPUs with AMX, bf16 for
    models built of dense convolutions and float32 for depthwise-convolution models.

    Measured on this project's 2-core AMX machine (benchmarks/predict.py, batch 32, 224 px,
    channels_last, two runs): a resnet50 training step runs 9.9-12.1 img/s in bf16 against
    4.8-5.0 in float32, but tf_efficientnet_lite0 gains nothing (9.8-15.1 img/s in bf16
    against 14.5-15.2 in float32): its depthwise convolutions do not use the matrix units.
    """
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if models.cpu_supports_bf16() and not models.has_depthwise_convs(model):
        return "bf16-mixed"
    return "32-true"


def batchnorm_mode(cfg) -> str:
    """How BatchNorm layers behave when the body trains ("train" whenever not pretrained).

    "frozen" (default): the pretrained statistics held fixed while everything else, BatchNorm's
    scale and shift included, fine-tunes (as Keras' transfer-learning guide does); "adapt":
    statistics re-estimated on training images before the frozen stage caches its features,
    then held; "train": statistics of each training batch, as in from-scratch training.
    Holding them is what makes the unfrozen stage start from the model the frozen stage
    trained. Measured on magnetic_tiles (benchmarks/finetune_stability.py --diagnose): with
    batch statistics the pooled features move by 113% of their norm, and a head at 0.81 on the
    cached features scores 0.24 on them; re-estimated statistics made the features worse for
    a linear head (0.63), so "frozen" is the default.
    """
    mode = getattr(cfg, "batchnorm", "frozen") or "frozen"
    return mode if cfg.pretrained else "train"


def discriminative_lrs(lr: float, n_groups: int, lr_mult: float = 100.0) -> list[float]:
    """Peak rates spaced geometrically from lr / lr_mult (first group) to lr (the head)."""
    if n_groups == 1:
        return [lr]
    return [lr / lr_mult ** (1 - i / (n_groups - 1)) for i in range(n_groups)]


def batch_mixer(cfg, task: Task):
    """The mixup/CutMix batch transform a config asks for, or None.

    Label smoothing is left to the loss (cross-entropy smooths soft targets the same way), so
    it applies alike to mixed batches and to the unmixed ones after `mixup_off_epoch`.
    """
    mixup, cutmix = float(getattr(cfg, "mixup", 0) or 0), float(getattr(cfg, "cutmix", 0) or 0)
    if mixup <= 0 and cutmix <= 0:
        return None
    return MixBatch(num_classes=len(task.classes), multi_label=task.multi_label, mixup=mixup,
                    cutmix=cutmix, off_epoch=getattr(cfg, "mixup_off_epoch", None),
                    seed=cfg.seed)


def augment_on_device(cfg) -> bool:
    """Whether training crops and flips run batched on the device ("device") rather than per
    image in the loader ("loader"); "auto" picks the device when training runs on CUDA."""
    where = getattr(cfg, "augment_on", "auto") or "auto"
    if where == "auto":
        return torch.cuda.is_available() and getattr(cfg, "accelerator", "auto") in (
            "auto", "gpu", "cuda")
    return where == "device"


def keep_presized(x: torch.Tensor) -> torch.Tensor:
    """The loader's transform when crops happen on the device: none."""
    return x
