"""Every setting of a run, each declared once: type, default, help, allowed values and bounds.

`TrainConfig` is the single declaration the rest reads: the CLI builds `imgclf train` and
`imgclf cv` from its fields (imgclf.cli.options), config.yaml is its fields, and `check`
refuses bad values with one line naming the flag, before anything is loaded or written.
Option checks that need the data (label smoothing on multi-label data, the progressive-resizing
schedule) stay with the stage that has the data (imgclf.training.recipe.check_techniques).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_text

# Allowed values of the choice options. They live here, the lowest layer, so that the check
# can run before anything else is imported; the modules that act on them import them from here.
TTA_REDUCTIONS = ("mean", "max")
THRESHOLD_METRICS = ("zero_one", "hamming", "f1_macro")
BALANCE_MODES = ("auto", "none", "weights", "sampler")
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
STAGE_SCHEDULES = ("continue", "restart")
AUGMENT_ON = ("auto", "loader", "device")
BATCHNORM_MODES = ("adapt", "frozen", "train")
RESIZE_METHODS = ("auto", "crop", "squish")
LOGGERS = ("csv", "tensorboard", "mlflow")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIZE = 16  # smaller inputs vanish in the backbones' downsampling


def option(default=None, help: str = "", *, choices: Sequence[str] = (), at_least=None,
           above=None, below=None, flag: str | None = None, path: bool = False):
    """A `TrainConfig` field with what the CLI and `check` need to know about it.

    Args:
        default: The default value (a list default is copied per instance).
        help: One line for `--help`.
        choices: The allowed values of a text option.
        at_least: Smallest allowed value (inclusive).
        above: The value must be greater than this.
        below: The value must be smaller than this.
        flag: Click declaration when the flag is not `--field-name`, e.g. "--a/--no-a".
        path: The option names a file or folder (the CLI takes and shows a path).
    """
    meta = {"help": help, "choices": tuple(choices), "at_least": at_least, "above": above,
            "below": below, "flag": flag, "path": path}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# What runs did before an option existed, for resuming them (TrainConfig.from_yaml(run=True)):
# the unfrozen stage trained every layer until --freeze-early came.
BEFORE_OPTION = {"freeze_early": False}


@dataclass
class TrainConfig:
    """Settings of `imgclf train` (the CLI flags have the same names with dashes).

    Each field's help, allowed values and bounds are declared with it below
    (`option(default, help, ...)`); `imgclf train --help` lists them, `check()` enforces them.
    """

    data: str = option("", "Image folder (class folders), or the root of the CSV's file names.",
                       path=True)
    csv: str | None = option(None, "Labels CSV (file names relative to DATA).", path=True)
    image_col: str | None = option(None, "CSV column with file names.")
    label_col: str | None = option(None, "CSV column with labels.")
    split_col: str | None = option(None, "CSV column with train/valid or an is_valid boolean.")
    label_delim: str = option(" ", "Separator of several labels in one CSV cell.")
    label_cols: str | None = option(None, "One-hot label columns (comma-separated) or 'auto'.")
    multi_label: bool | None = option(None, "Force the task (default: detect).",
                                      flag="--multi-label/--single-label")
    allow_outside_data: bool = option(
        False, "CSV: read files named outside DATA (absolute or ../ names); refused otherwise.")
    label_pattern: str | None = option(None, "Regex; its first group on the file name is the label.")
    group_col: str | None = option(None, "CSV column of groups kept on one side of the split.")
    group_pattern: str | None = option(
        None, "Regex; its first group on the relative path is the group.")
    corrections: str | None = option(
        None, "Corrections CSV (`imgclf review` writes RUN/corrections.csv): relabel, exclude or "
        "mark images negative as it says; the data itself is not changed.", path=True)
    corrections_sha256: str | None = option(
        None, "sha256 the --corrections file must have (recorded in config.yaml when the run "
        "starts, so a changed file is refused on --resume).")
    valid_pct: float = option(0.2, "Validation fraction when the data has no split.",
                              above=0, below=1)
    folds: int = option(0, "Cross-validation: folds the images are dealt into (stratified, "
                        "groups kept whole); 0 keeps the data's split.", at_least=0)
    fold: int | None = option(None, "Cross-validation: the fold (0 .. FOLDS-1) validated on; "
                              "the rest trains.", at_least=0)
    seed: int = option(42, "Seed for split, augmentation and initialisation.", at_least=0)
    model: str = option("tf_efficientnet_lite0", "Any timm architecture.")
    weights: str | None = option(None, "Local pretrained weights file for --model.", path=True)
    pretrained: bool = option(True, "Start from ImageNet weights.")
    size: int | None = option(None, "Input size (default: the model's).", at_least=MIN_SIZE)
    epochs: int | None = option(
        None, "Epochs with the whole network trainable (default: 2 to 5, more when the frozen "
        "stage leaves more error; 5 without a frozen stage).", at_least=0)
    time_budget: str | None = option(
        None, "End the run, report included, within this wall time, e.g. 90s, 5m, 1h30m: the "
        "unfrozen stage is planned from measured step times (replaces --epochs).")
    freeze_epochs: int = option(1, "Epochs training only the head on a frozen body.", at_least=0)
    lr: float | str = option("auto", "Peak learning rate, or 'auto' (LR finder, valley rule).",
                             above=0)
    batch_size: int = option(32, "Images per step.", at_least=1)
    balance: str = option("auto", "Class imbalance: none | weights | sampler | auto (weights when "
                          "the largest class is over 3x the smallest).", choices=BALANCE_MODES)
    precision: str = option("auto", "auto | 32 | bf16-mixed | 16-mixed.", choices=PRECISIONS)
    workers: int | None = option(None, "Loader processes (default: from the core count).",
                                 at_least=0)
    cache_dir: str | None = option(None, "Decode cache folder ('' disables it).")
    cache_max_gb: float | None = option(
        None, "Decode cache cap in GB; least recently used images are evicted beyond it "
        "(default: 20 GB or a quarter of the disk space the cache has, whichever is less).",
        above=0)
    deterministic: bool = option(False, "Bit-for-bit repeatable training (slower).")
    checkpoint_every: int = option(0, "Also checkpoint every N steps.", at_least=0)
    threshold_metric: str = option("zero_one", "Multi-label: zero_one | hamming | f1_macro.",
                                   choices=THRESHOLD_METRICS)
    out: str = option("runs", "Folder for run directories.", path=True)
    name: str | None = option(None, "Run directory name.")
    accelerator: str = option("auto", "auto | cpu | gpu | ... (Lightning accelerator).")
    devices: int | str = option("auto", "Devices per machine: auto, a count, or a list like 0,1.")
    num_nodes: int = option(1, "Machines taking part (see README: multi-node).", at_least=1)
    strategy: str = option("auto", "auto | ddp | ... (Lightning strategy).")
    norm_stats: str = option(
        "auto", "Input normalisation: auto (the model's when pretrained, else computed from the "
        "training images) | imagenet | MEAN,STD | M1,M2,M3,S1,S2,S3.")
    sizes: list[int] | None = option(
        None, "Progressive resizing: sizes of the training stages, small to large, e.g. "
        "128,192,224.", at_least=MIN_SIZE)
    stage_epochs: list[int] | None = option(
        None, "Epochs per --sizes stage, e.g. 4,3,3 (default: --epochs split evenly).",
        at_least=1)
    stage_schedule: str = option(
        "continue", "Learning rate over --sizes stages: continue (one one-cycle across them) | "
        "restart (a one-cycle per stage).", choices=STAGE_SCHEDULES)
    mixup: float = option(0.0, "Mixup Beta parameter (0: off; 0.2-0.4 is common).", at_least=0)
    cutmix: float = option(0.0, "CutMix Beta parameter (0: off; 1.0 is common).", at_least=0)
    mixup_off_epoch: int | None = option(
        None, "Epoch (as numbered in metrics.csv) from which batches are no longer mixed.",
        at_least=0)
    label_smoothing: float = option(
        0.0, "Label smoothing for single-label data (0.1 is usual).", at_least=0, below=1)
    tta: int = option(0, "Test-time augmentation views the saved model adds (0: off); "
                      "validation is reported with and without.", at_least=0)
    tta_reduce: str = option("mean", "How TTA views combine: mean | max.", choices=TTA_REDUCTIONS)
    augment_on: str = option(
        "auto", "Where training crops run: loader (per image) | device (batched on the GPU/CPU "
        "doing the training) | auto (device on CUDA).", choices=AUGMENT_ON)
    batchnorm: str = option(
        "frozen", "BatchNorm while a pretrained body fine-tunes: frozen (pretrained statistics "
        "held) | adapt (statistics re-estimated on the training images, then held) | train "
        "(each batch's). From scratch always train.", choices=BATCHNORM_MODES)
    lr_mult: float = option(
        10.0, "Discriminative rates: the body's first layers train at the unfrozen rate / "
        "LR_MULT, later layers at rates rising to it (1: one rate).", at_least=1)
    # Held on every set, small ones too. On fridgeObjects (86 training images) training them
    # scored 0.972 out of fold against 0.953 (five folds: two more of the 5 cans right), the
    # single split 0.905 either way, but in one hour on the 2-core VM the whole run took
    # 23.9-24.2 s against 17.1 s held (1.5 GB more activation memory, whose first touch costs
    # this VM 2-3 s a GB; benchmarks/peers.py), out of reach of the 0.25x bar against fastai.
    freeze_early: bool = option(
        True, "While a pretrained body fine-tunes, keep its layers at 1/2 and 1/4 of the input "
        "resolution (the stem and first stages: under 1% of the parameters, the most memory "
        "and time of a step) as they are.")
    ema: float = option(
        0.5, "Validate and keep a moving average of the unfrozen stage's weights with this "
        "half-life in epochs (0: the weights themselves).", at_least=0)
    # "squish" keeps the whole image: on magnetic_tiles, whose defects sit anywhere in tiles of
    # many shapes, the kept model reaches 0.962 against 0.859 with "auto" (which crops the half
    # of them no longer than 1.5:1), with no dip after the frozen stage; caltech101 0.939,
    # fridgeObjects 0.952 as with crops. Centre crops remain better on multilabelFridgeObjects'
    # 4:3 photos (kept 0.923 against 0.885, one image of 26); benchmarks/finetune_stability.py.
    resize: str = option(
        "squish", "Images to squares: auto (centre crop up to aspect 1.5, squish longer ones) | "
        "squish (whole image, aspect ignored) | crop (centre square).", choices=RESIZE_METHODS)
    logger: list[str] | None = option(
        None, "Experiment tracking: csv | tensorboard | mlflow; several comma-separated or "
        "repeated (tensorboard and mlflow need the `track` extra).", choices=LOGGERS)
    mlflow_uri: str | None = option(
        None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default).")
    experiment: str = option("imgclf", "MLflow experiment the run is logged under.")

    def __post_init__(self):
        if isinstance(self.logger, str):  # logger="csv,mlflow" from Python
            self.logger = parse_words(self.logger)

    def to_yaml(self, path: Path) -> None:
        atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path, run: bool = False) -> "TrainConfig":
        """The settings saved in a config.yaml; unknown keys are refused with the closest name.

        With `run` (resuming the run that wrote it), a setting added after the run started
        takes the value that reproduces what the run did (`BEFORE_OPTION`), not today's
        default: its checkpoints were written that way.
        """
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            # safe_load refuses python/object tags; the user needs the line, not the traceback.
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ImgclfError(f"{path}: not a readable settings file{at} ({problem}): fix that "
                              "line, or start a new run instead of resuming") from None
        if not isinstance(raw, dict):
            raise ImgclfError(f"{path}: expected settings as `name: value` lines")
        # Runs written before the dead `extra` field was removed carry `extra: {}`.
        if not raw.get("extra", True):
            del raw["extra"]
        refuse_unknown(raw, option_names(), what="setting", where=f"{path}: ")
        if run:
            raw = {**BEFORE_OPTION, **raw}
        hints = typing.get_type_hints(cls)
        return cls(**{k: _from_yaml_value(hints[k], v, k) for k, v in raw.items()})

    def check(self) -> None:
        """Refuse any setting outside its choices or bounds, or at odds with another.

        One line naming the flag, e.g. "--batch-size 0 must be >= 1"; nothing is loaded or
        written before this passes.

        Raises:
            ImgclfError: The first bad setting.
        """
        if not self.data:
            raise ImgclfError("no data given: pass a folder of images, e.g. `imgclf train photos/`")
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.folds == 1:
            raise ImgclfError("--folds 1: cross-validation needs at least 2 folds (0: no folds)")
        if self.fold is not None and not self.fold < self.folds:
            raise ImgclfError(f"--fold {self.fold} must be < --folds ({self.folds}): folds are "
                              "numbered 0 .. FOLDS-1")
        if self.label_smoothing and self.multi_label:
            raise ImgclfError("--label-smoothing applies to single-label data, and "
                              "--multi-label is set: drop one of them")
        if self.sizes and self.size and self.size != self.sizes[-1]:
            raise ImgclfError(f"--size {self.size} and --sizes {','.join(map(str, self.sizes))} "
                              "disagree: the last of --sizes is the final size; drop --size")
        if self.stage_epochs and not self.sizes and len(self.stage_epochs) != 1:
            raise ImgclfError("--stage-epochs needs --sizes with as many sizes as stages")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
            if self.epochs is not None or self.sizes or self.stage_epochs:
                raise ImgclfError("--time-budget plans the unfrozen epochs itself: drop --epochs "
                                  "(and --sizes/--stage-epochs), or drop --time-budget")
        if self.corrections_sha256 and not self.corrections:
            raise ImgclfError("--corrections-sha256 pins a --corrections file, and none is given")
        parse_norm_stats(self.norm_stats)


def option_names() -> list[str]:
    """Every TrainConfig field name, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def flag_name(name: str) -> str:
    """The CLI flag of a TrainConfig field, as messages name it."""
    return "--" + name.replace("_", "-")


def refuse_unknown(names, valid: Sequence[str], *, what: str = "option", where: str = "") -> None:
    """Raise for the first name not in `valid`, suggesting the closest valid one.

    Raises:
        ImgclfError: e.g. "unknown option 'epoch'; did you mean 'epochs'?".
    """
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else " (the options are TrainConfig's fields; see `imgclf train --help`)")
            raise ImgclfError(f"{where}unknown {what} {name!r}{hint}")


def with_options(config: TrainConfig | None = None, **options) -> TrainConfig:
    """`config` (default: the defaults) with `options` replacing fields of the same name.

    Raises:
        ImgclfError: An option is not a field (naming the closest one), instead of the bare
            TypeError of `dataclasses.replace`.
    """
    refuse_unknown(options, option_names())
    return dataclasses.replace(config or TrainConfig(), **options)


def _check_field(f: dataclasses.Field, value) -> None:
    meta, flag = f.metadata, flag_name(f.name)
    if value is None or (f.name == "lr" and value == "auto"):
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        if meta.get("choices") and v not in meta["choices"]:
            raise ImgclfError(f"{flag} {v!r} is not one of {' | '.join(meta['choices'])}")
    bounds = [(meta.get("at_least"), ">=", lambda v, b: v >= b),
              (meta.get("above"), ">", lambda v, b: v > b),
              (meta.get("below"), "<", lambda v, b: v < b)]
    bounds = [b for b in bounds if b[0] is not None]
    if not bounds:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    rule = " and ".join(f"{op} {b:g}" for b, op, _ in bounds)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            wanted = "a number or 'auto'" if f.name == "lr" else "a number"
            raise ImgclfError(f"{flag} takes {wanted}, not {v!r}")
        if not all(ok(v, b) for b, _, ok in bounds):
            raise ImgclfError(f"{flag} {_show(value)} must be {rule}")


def _from_yaml_value(hint, value, name: str):
    """A settings-file value as the field takes it: YAML reads `1e-3` as text and a user may
    write a list as `128,192,224` or a single logger as `tensorboard`."""
    if not isinstance(value, str):
        return [value] if hint == (list[int] | None) and isinstance(value, int) else value
    if hint in (float, float | str) and value.strip() not in ("", "auto"):
        try:
            return float(value)
        except ValueError:
            return value  # check() names the flag and what it takes
    if hint == (list[int] | None):
        return parse_ints(value, flag_name(name))
    if hint == (list[str] | None):
        return parse_words(value)
    return value


def parse_words(text: str | Sequence[str] | None) -> list[str] | None:
    """"csv,mlflow" or ["csv", "mlflow,tensorboard"] as a list of words; empty is None."""
    if text is None:
        return None
    items = [text] if isinstance(text, str) else list(text)
    words = [w.strip() for item in items for w in str(item).split(",") if w.strip()]
    return words or None


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(_show, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_duration(text: str | float | int | None, flag: str = "--time-budget") -> float | None:
    """Seconds from "90", "90s", "5m", "1h30m" or "1.5h" (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?"
                             r"(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or not parts or not any(parts.groups()):
            raise ImgclfError(f"{flag} {text!r}: give a duration such as 90s, 5m or 1h30m")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not seconds > 0 or not math.isfinite(seconds):
        raise ImgclfError(f"{flag} {text!r}: the budget must be a positive duration")
    return seconds


def check_tta(n: int, reduce: str) -> None:
    """Refuse a negative number of TTA views or an unknown reduction (the bundle asks too)."""
    if n < 0:
        raise ImgclfError(f"--tta {n}: the number of augmented views must be >= 0")
    if reduce not in TTA_REDUCTIONS:
        raise ImgclfError(f"--tta-reduce {reduce!r} is not one of {' | '.join(TTA_REDUCTIONS)}")


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
    if len(values) != 6 or any(not math.isfinite(v) for v in values) or min(values[3:]) <= 0:
        raise ImgclfError(f"--norm-stats {text!r}: use auto, imagenet, MEAN,STD or "
                          "M1,M2,M3,S1,S2,S3 on the 0-1 scale, with positive std, e.g. 0.5,0.25")
    return tuple(values[:3]), tuple(values[3:])
