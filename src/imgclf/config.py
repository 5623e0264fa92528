"""Every setting of a run, resolved, so that config.yaml alone reproduces it.

Pure option checks that more than one stage needs live here too (`check_tta`: training checks
the flags, the deploy bundle checks what it is asked to predict with).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_text

TTA_REDUCTIONS = ("mean", "max")


@dataclass
class TrainConfig:
    """Settings of `imgclf train` (the CLI flags have the same names with dashes).

    Attributes:
        data: Folder of images (class folders, or the root of the CSV's file names).
        csv: Labels CSV; file names in it are relative to `data`.
        image_col: CSV column with file names (default: first column or a column named like one).
        label_col: CSV column with labels (default: second column or a column named like one).
        split_col: CSV column with train/valid values or an is_valid boolean.
        label_delim: Separator of several labels in one CSV cell (multi-label).
        label_cols: One-hot label columns, comma-separated, or "auto".
        multi_label: Force multi-label (None: detect from the data).
        label_pattern: Regex whose first group on the file name is the label.
        group_col: CSV column of group ids kept on one side of the split.
        group_pattern: Regex whose first group on the relative path is the group id.
        valid_pct: Fraction held out for validation when the data has no split.
        folds: Cross-validation: number of folds the train and valid images are dealt into
            (stratified, group-aware); 0 keeps the source's split.
        fold: Cross-validation: the fold (0 .. folds - 1) validated on; the rest trains.
        seed: Seed for the split, augmentation order and initialisation.
        model: timm architecture.
        weights: Local weights file for `model` (else the hub, unless `pretrained` is False).
        pretrained: Start from ImageNet weights.
        size: Input size (default: the model's pretrained size).
        epochs: Epochs with the whole network trainable.
        freeze_epochs: Epochs training only the new head on a frozen body (0 skips the stage).
        lr: Peak learning rate, or "auto" to run the learning-rate finder.
        batch_size: Images per step.
        balance: Class imbalance: "none", "weights" (loss class weights), "sampler"
            (class-balanced batches) or "auto" (weights when the largest training class is
            over 3x the smallest; see imgclf.training.balance).
        precision: "auto", "32", "bf16-mixed" or "16-mixed".
        workers: DataLoader processes (None: chosen from the core count).
        cache_dir: Decode cache folder (None: the user cache folder); "" disables the disk cache.
        deterministic: Bit-for-bit repeatable training (slower).
        checkpoint_every: Also checkpoint every N steps (0: once per epoch only).
        threshold_metric: Multi-label metric the decision threshold maximises.
        out: Folder that holds run directories.
        name: Run directory name (default: derived from the data folder and time).
        accelerator: Lightning accelerator for the unfrozen stage: "auto", "cpu", "gpu", ...
        devices: Devices per machine: "auto", a count, or a list such as "0,1".
        num_nodes: Machines taking part (multi-node runs are started by torchrun or SLURM).
        strategy: Lightning strategy: "auto", "ddp", ... (ddp starts one process per device).
        norm_stats: Input normalisation: "auto" (the model's own statistics when pretrained,
            else computed from a sample of the training images), "imagenet", or explicit values
            "MEAN,STD" (one value for every channel) or "M1,M2,M3,S1,S2,S3".
        sizes: Progressive resizing: the input size of each stage of whole-network training,
            smallest first; the last is the size the bundle predicts at.
        stage_epochs: Epochs of each `sizes` stage (None: `epochs` split evenly, any remainder
            going to the earlier, cheaper stages).
        stage_schedule: Learning rate over `sizes` stages: "continue" (one one-cycle spanning
            all stages, so a new size starts at the rate the last one ended with) or "restart"
            (each stage a one-cycle of its own, peak falling as 1/(stage+1)).
        mixup: Beta parameter of mixup (0: off).
        cutmix: Beta parameter of CutMix (0: off).
        mixup_off_epoch: Epoch (metrics.csv numbering) from which batches are no longer mixed.
        label_smoothing: Cross-entropy label smoothing (single-label).
        tta: Test-time augmentation views the bundle adds to the plain view (0: off); the run's
            validation numbers and predictions.csv are then with TTA.
        tta_reduce: How TTA views are combined: "mean" or "max".
        augment_on: Where training crops and flips run: "loader" (per image, in the data
            loader), "device" (batched on the training device) or "auto" (the device on CUDA).
        batchnorm: BatchNorm during fine-tuning of a pretrained body: "frozen" (the pretrained
            statistics held fixed), "adapt" (statistics re-estimated on the training images,
            then held fixed) or "train" (statistics of each batch). From scratch always
            "train".
        lr_mult: Discriminative learning rates: the body's first layer group trains at the
            unfrozen rate divided by this, the layers after it at rates rising geometrically.
        resize: How images become squares: "squish" (the whole image resized to the square),
            "crop" (short side resized, centre square kept) or "auto" (crop up to an aspect
            ratio of 1.5, squish longer images). Squish is the default: on magnetic_tiles,
            whose defects sit anywhere in strips of many shapes, it took the kept model from
            0.910 (auto) to 0.962 (benchmarks/finetune_stability.py).
    """

    data: str = ""
    csv: str | None = None
    image_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    label_delim: str = " "
    label_cols: str | None = None
    multi_label: bool | None = None
    label_pattern: str | None = None
    group_col: str | None = None
    group_pattern: str | None = None
    valid_pct: float = 0.2
    folds: int = 0
    fold: int | None = None
    seed: int = 42
    model: str = "tf_efficientnet_lite0"
    weights: str | None = None
    pretrained: bool = True
    size: int | None = None
    epochs: int = 5
    freeze_epochs: int = 1
    lr: float | str = "auto"
    batch_size: int = 32
    balance: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache_dir: str | None = None
    deterministic: bool = False
    checkpoint_every: int = 0
    threshold_metric: str = "zero_one"
    out: str = "runs"
    name: str | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    norm_stats: str = "auto"
    sizes: list[int] | None = None
    stage_epochs: list[int] | None = None
    stage_schedule: str = "continue"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_off_epoch: int | None = None
    label_smoothing: float = 0.0
    tta: int = 0
    tta_reduce: str = "mean"
    augment_on: str = "auto"
    batchnorm: str = "frozen"
    lr_mult: float = 10.0
    resize: str = "squish"
    extra: dict = field(default_factory=dict)

    def to_yaml(self, path: Path) -> None:
        atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path) -> "TrainConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ImgclfError(f"{path}: unknown settings {', '.join(unknown)}; remove them")
        return cls(**raw)


def check_tta(n: int, reduce: str) -> None:
    """Refuse a negative number of TTA views or an unknown reduction."""
    if n < 0:
        raise ImgclfError(f"--tta {n}: the number of augmented views must be >= 0")
    if reduce not in TTA_REDUCTIONS:
        raise ImgclfError(f"--tta-reduce {reduce!r} is not one of {' | '.join(TTA_REDUCTIONS)}")
