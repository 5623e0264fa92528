"""The training techniques a config asks for, checked and resolved before any work starts.

Progressive resizing (`size_schedule`), input normalisation (`resolve_norm_stats`) and the
settings of mixup, CutMix, label smoothing and test-time augmentation (`check_techniques`), so
that a bad flag fails in a second with a message naming it, not after an hour of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgclf.config import TTA_REDUCTIONS, check_tta  # noqa: F401 (TTA_REDUCTIONS re-exported)
from imgclf.data.presize import RESIZE_METHODS
from imgclf.data.transforms import image_stats
from imgclf.errors import ImgclfError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SizeStage:
    """One stage of progressive resizing: `epochs` whole-network epochs at `size`."""

    size: int
    epochs: int


def parse_ints(text: str | Sequence[int] | None, flag: str) -> list[int] | None:
    """"128,192,224" (or a list) as positive integers; None stays None."""
    if text is None or text == "":
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ImgclfError(f"{flag} takes comma-separated whole numbers, e.g. 128,192,224; "
                          f"got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ImgclfError(f"{flag} takes positive whole numbers, e.g. 128,192,224; got {text!r}")
    return values


def size_schedule(sizes: Sequence[int] | None, epochs: int,
                  stage_epochs: Sequence[int] | None = None,
                  final_size: int | None = None) -> list[SizeStage]:
    """The stages of whole-network training.

    Args:
        sizes: Input size per stage, smallest first (None: one stage at `final_size`).
        epochs: Whole-network epochs in all, split over the stages when `stage_epochs` is None
            (evenly; the remainder goes to the earliest stages, whose epochs are cheapest).
        stage_epochs: Epochs per stage; they replace `epochs`.
        final_size: The size without progressive resizing.

    Returns:
        One stage per size; the last one's size is what the bundle predicts at.
    """
    if not sizes:
        if stage_epochs and len(stage_epochs) != 1:
            raise ImgclfError("--stage-epochs needs --sizes with as many sizes as stages")
        return [SizeStage(int(final_size or 0), int(epochs))]
    sizes = [int(s) for s in sizes]
    if sizes[-1] != max(sizes):
        raise ImgclfError(f"--sizes {','.join(map(str, sizes))}: the last size is the one the "
                          "model predicts at and must be the largest; list them small to large")
    if stage_epochs:
        if len(stage_epochs) != len(sizes):
            raise ImgclfError(f"--stage-epochs has {len(stage_epochs)} values for "
                              f"{len(sizes)} sizes: give one number of epochs per size")
        counts = [int(e) for e in stage_epochs]
    else:
        if epochs < len(sizes):
            raise ImgclfError(f"--epochs {epochs} cannot be split over {len(sizes)} sizes: "
                              f"give at least {len(sizes)} epochs, or fewer --sizes")
        base, extra = divmod(int(epochs), len(sizes))
        counts = [base + (1 if i < extra else 0) for i in range(len(sizes))]
    if any(c <= 0 for c in counts):
        raise ImgclfError("every progressive-resizing stage needs at least one epoch "
                          f"(--stage-epochs {','.join(map(str, counts))})")
    return [SizeStage(s, c) for s, c in zip(sizes, counts)]


def parse_norm_stats(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | str:
    """"auto" | "imagenet" | "MEAN,STD" | "M1,M2,M3,S1,S2,S3" (0-1 scale).

    Returns:
        "auto", or the (mean, std) triples.
    """
    t = (text or "auto").strip().lower()
    if t == "auto":
        return "auto"
    if t == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        values = [float(v) for v in t.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [values[0]] * 3 + [values[1]] * 3
    if len(values) != 6 or any(not np.isfinite(v) for v in values) or min(values[3:]) <= 0:
        raise ImgclfError(f"--norm-stats {text!r}: use auto, imagenet, MEAN,STD or "
                          "M1,M2,M3,S1,S2,S3 on the 0-1 scale, with positive std, e.g. 0.5,0.25")
    return tuple(values[:3]), tuple(values[3:])


def resolve_norm_stats(text: str, pretrained: bool, model_stats: tuple, images) -> tuple:
    """The mean and std the run normalises with, and where they came from.

    Args:
        text: The --norm-stats setting.
        pretrained: Whether the model starts from pretrained weights.
        model_stats: (mean, std) of the model's pretrained config.
        images: Presized uint8 training images (a sequence of [3, P, P] arrays), sampled for
            "auto" without pretrained weights.

    Returns:
        (mean, std, source), source one of "model", "data", "imagenet", "given".
    """
    parsed = parse_norm_stats(text)
    if parsed == "auto":
        if pretrained:
            return tuple(model_stats[0]), tuple(model_stats[1]), "model"
        mean, std = image_stats(images)
        return mean, std, "data"
    source = "imagenet" if (text or "").strip().lower() == "imagenet" else "given"
    return parsed[0], parsed[1], source


STAGE_SCHEDULES = ("continue", "restart")


BATCHNORM_MODES = ("adapt", "frozen", "train")


def check_techniques(cfg, multi_label: bool | None = None) -> None:
    """Refuse settings that make no sense, before the run folder exists."""
    if cfg.stage_schedule not in STAGE_SCHEDULES:
        raise ImgclfError(f"--stage-schedule {cfg.stage_schedule!r} is not one of "
                          f"{' | '.join(STAGE_SCHEDULES)}")
    for flag, value in (("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix)):
        if value < 0:
            raise ImgclfError(f"{flag} {value:g}: the Beta parameter must be >= 0 (0 turns it "
                              "off; 0.2-0.4 for mixup and 1.0 for CutMix are common)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ImgclfError(f"--label-smoothing {cfg.label_smoothing:g} must be in [0, 1); "
                          "0.1 is the usual value")
    if cfg.label_smoothing and multi_label:
        raise ImgclfError("--label-smoothing applies to single-label data, and this data is "
                          "multi-label: drop the flag")
    check_tta(cfg.tta, cfg.tta_reduce)
    if cfg.mixup_off_epoch is not None and cfg.mixup_off_epoch < 0:
        raise ImgclfError(f"--mixup-off-epoch {cfg.mixup_off_epoch} must be >= 0")
    parse_norm_stats(cfg.norm_stats)
    if cfg.augment_on not in ("auto", "loader", "device"):
        raise ImgclfError(f"--augment-on {cfg.augment_on!r} is not one of auto | loader | device")
    if not float(cfg.lr_mult) >= 1.0:
        raise ImgclfError(f"--lr-mult {cfg.lr_mult:g} must be >= 1 (1: one rate for the whole "
                          "network; 10 is the default)")
    if cfg.batchnorm not in BATCHNORM_MODES:
        raise ImgclfError(f"--batchnorm {cfg.batchnorm!r} is not one of "
                          f"{' | '.join(BATCHNORM_MODES)}")
    if cfg.resize not in RESIZE_METHODS:
        raise ImgclfError(f"--resize {cfg.resize!r} is not one of {' | '.join(RESIZE_METHODS)}")
    if cfg.sizes and cfg.size and cfg.size != cfg.sizes[-1]:
        raise ImgclfError(f"--size {cfg.size} and --sizes {','.join(map(str, cfg.sizes))} "
                          "disagree: the last of --sizes is the final size; drop --size")
    size_schedule(cfg.sizes, cfg.epochs, cfg.stage_epochs, cfg.size or 1)
