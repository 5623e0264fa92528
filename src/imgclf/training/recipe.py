"""The training techniques a config asks for, checked and resolved before any work starts.

Progressive resizing (`size_schedule`), input normalisation (`resolve_norm_stats`) and the
checks that need the data or the stage arithmetic (`check_techniques`, after
`TrainConfig.check`), so that a bad flag fails in a second with a message naming it, not after
an hour of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The option parsers and constants moved to imgclf.config (the one place options are checked);
# re-exported here for the callers that knew them as recipe's.
from imgclf.config import (IMAGENET_MEAN, IMAGENET_STD, TrainConfig,  # noqa: F401
                           parse_ints, parse_norm_stats)
from imgclf.data.transforms import image_stats
from imgclf.errors import ImgclfError
from imgclf.training.budget import MAX_EPOCHS


@dataclass(frozen=True)
class SizeStage:
    """One stage of progressive resizing: `epochs` whole-network epochs at `size`."""

    size: int
    epochs: int


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


def check_techniques(cfg, multi_label: bool | None = None) -> None:
    """Refuse settings that make no sense, before the run folder exists.

    Every option on its own is `TrainConfig.check`'s; what is left here needs the data (is it
    multi-label?) or the stage arithmetic of `size_schedule`.
    """
    cfg.check()
    if cfg.label_smoothing and multi_label:
        raise ImgclfError("--label-smoothing applies to single-label data, and this data is "
                          "multi-label: drop the flag")
    size_schedule(cfg.sizes, default_epochs(cfg), cfg.stage_epochs, cfg.size or 1)


def default_epochs(cfg: TrainConfig) -> int:
    """--epochs, or where the frozen stage's score cannot choose them (progressive
    resizing splits them before training starts) the longest default schedule."""
    return int(cfg.epochs) if cfg.epochs is not None else MAX_EPOCHS
