"""The Python API: `train`, `evaluate`, `predict`, `load`, `cross_validate`, `mine`.

A thin facade: the public signatures and their documentation, delegating to `imgclf.commands`
(one module per verb) and to the bundle in `imgclf.deploy`. The CLI is a thin layer over these;
nothing in the package imports this module.

The functions print nothing: they log to the "imgclf" logger (`logging.basicConfig(level="INFO")`
shows the messages) and report progress through `imgclf.progress`; `imgclf` on the command line
draws both. Their `console` argument is accepted for compatibility and ignored.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from imgclf.commands import cv as _cv
from imgclf.commands import evaluate as _evaluate
from imgclf.commands import train as _train
from imgclf.commands.cv import CvResult
from imgclf.commands.mine import MiningResult
from imgclf.commands.mine import command as _mine
from imgclf.commands.run import Run
from imgclf.config import TrainConfig, parse_words, with_options
from imgclf.deploy.bundle import Bundle
from imgclf.deploy.bundle import load as load_bundle
from imgclf.errors import ImgclfError

__all__ = ["train", "evaluate", "predict", "load", "cross_validate", "mine", "show_batch", "Run"]


def _ignore_console(console) -> None:
    """The deprecated `console` argument: accepted, ignored, with a DeprecationWarning."""
    if console is not None:
        warnings.warn("console= is deprecated and ignored: imgclf logs to the 'imgclf' logger "
                      "(configure logging to see the messages)", DeprecationWarning, stacklevel=3)


def train(data: str | Path | None = None, *, config: TrainConfig | str | Path | None = None,
          resume: str | Path | None = None, console=None, budget_start: float | None = None,
          **options) -> Run | None:
    """Train a classifier and write a run directory.

    Args:
        data: Image folder (class folders, or the root of a CSV's file names).
        config: Full settings, or a YAML file of them (TrainConfig's field names; a run's
            config.yaml reproduces that run); `data` and `options` override its fields.
        resume: A run directory to continue after an interruption (its config is reused).
        console: Deprecated and ignored (messages go to the "imgclf" logger).
        budget_start: When `time_budget` starts counting, as `time.monotonic()` (default:
            this call; the command line passes its process's start, imports included).
        **options: Any `TrainConfig` field, e.g. `epochs=3, model="resnet18"`.

    Returns:
        The run, whose `load()` gives the bundle; None in the other processes of a
        multi-process (DDP) run, where only global rank 0 writes the run directory.

    Raises:
        ImgclfError: An unknown option (naming the closest one) or a bad value, before
            anything is read or written.
    """
    _ignore_console(console)
    if resume is None:  # a resumed run reuses its config.yaml, checked when it was written
        config = with_options(_settings(config), **options)
        if data is not None:
            config = dataclasses.replace(config, data=str(data))
        config.check()
        data, options = None, {}
    return _train.train(data, config=config, resume=resume, budget_start=budget_start,
                        **options)


def _settings(config: TrainConfig | str | Path | None) -> TrainConfig | None:
    """`config` as a TrainConfig: a path is read as a settings file (unknown names refused)."""
    if config is None or isinstance(config, TrainConfig):
        return config
    if not Path(config).is_file():
        raise ImgclfError(f"config={str(config)!r}: no such settings file")
    return TrainConfig.from_yaml(Path(config))


def show_batch(data: str | Path | None = None, n: int = 12, *, split: str = "train",
               seed: int = 0, cols: int = 4, config: TrainConfig | str | Path | None = None,
               **options):
    """A figure of what the model will see: training images decoded, presized and augmented
    as training does it (random resized crop and flip), titled with their labels.

    Args:
        data: Image folder (or the root of a CSV's file names), as for `train`.
        n: Images shown (a seeded random choice).
        split: "train" (augmented) or "valid" (the centre crop validation sees).
        seed: Seed of the choice and the augmentation (the caller's random state is kept).
        cols: Images per row.
        config: Settings, or a YAML file of them; `options` (model=, size=, csv=, ...)
            override its fields.

    Returns:
        A matplotlib Figure (made without pyplot: no backend is switched).
    """
    from imgclf.report.notebook import show_batch as _show_batch  # lazy: matplotlib, timm

    return _show_batch(data, n, split=split, seed=seed, cols=cols, config=_settings(config),
                       **options)


def load(path: str | Path) -> Bundle:
    """Load a trained model from a run directory or bundle folder."""
    return load_bundle(path)


def predict(bundle_or_path, paths, **kwargs):
    """Predict image files with a bundle (or a path to one); see `Bundle.predict`."""
    bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else load_bundle(bundle_or_path)
    return bundle.predict(paths, **kwargs)


def evaluate(target: str | Path, data: str | Path | None = None, *, out: str | Path | None = None,
             tta: int | None = None, tta_reduce: str | None = None, batch_size: int = 32,
             console=None, **source_options) -> dict:
    """Score a bundle on its run's validation set, or on another labelled folder or CSV.

    Args:
        target: Run directory or bundle folder.
        data: Labelled images (folder or CSV root); None uses the run's validation split.
        out: Folder for the results (default: `<run>/eval/<data name>` or the run itself).
        tta: Augmented views to combine with the plain one (None: the bundle's setting);
            when > 0 the plain score is reported next to the TTA score.
        tta_reduce: "mean" or "max" over the views (None: the bundle's setting, else mean).
        batch_size: Images per forward pass.
        console: Deprecated and ignored (messages go to the "imgclf" logger).
        **source_options: Data-source options (csv, label_col, ...) as for `train`.

    Returns:
        The metrics dict (also written as metrics.json in the output folder).
    """
    _ignore_console(console)
    return _evaluate.evaluate(target, data, out=out, tta=tta, tta_reduce=tta_reduce,
                              batch_size=batch_size, **source_options)


def cross_validate(data: str | Path | None = None, *, folds: int = 5,
                   config: TrainConfig | str | Path | None = None,
                   resume: str | Path | None = None,
                   console=None, **options) -> CvResult:
    """Train one run per fold and pool their validation predictions.

    Args:
        data: Image folder (or CSV root), as for `imgclf.api.train`.
        folds: Number of folds.
        config: Training settings, or a YAML file of them; `options` override its fields.
            `out` is the folder that receives the cross-validation folder, `name` names it.
        resume: A cross-validation folder to finish: finished folds are kept, an interrupted
            fold resumes, missing folds are trained.
        console: Deprecated and ignored (messages go to the "imgclf" logger).
        **options: Any `TrainConfig` field.

    Returns:
        The result; the same numbers are in `<cv_dir>/cv_summary.json`.

    Raises:
        ImgclfError: An unknown option (naming the closest one) or a bad value, before
            anything is read or written.
    """
    _ignore_console(console)
    return _cv.cross_validate(data, folds=folds, config=_settings(config), resume=resume,
                              **options)


def mine(run: str | Path, pool: str | Path | None = None, *, per_round: int | None = None,
         rounds: int | None = None, epochs: int | None = None, initial: int | None = None,
         negative_label: str | None = None, valid_negatives: str | Path | None = None,
         pool_valid_pct: float | None = None, patience: int | None = None,
         lr: float | None = None, freeze_epochs: int | None = None,
         batch_size: int | None = None, seed: int | None = None, resume: bool = False,
         restart: bool = False, logger: str | list[str] | None = None,
         config: str | Path | None = None, corrections: str | Path | None = None,
         console=None) -> MiningResult:
    """Hard negative mining on a trained run; the best round's model becomes its bundle.

    Rerunning on a run that was interrupted continues from its manifest: finished rounds are
    not redone, and a round whose picks were recorded is trained on the same picks. Unset
    options take the values of `MineOptions` (on a rerun: the values recorded in the manifest).

    Args:
        run: Run directory of a finished `imgclf train`.
        pool: Folder of unlabelled images that contain none of the classes (on a rerun, may be
            left out).
        per_round: Hard negatives added per round.
        rounds: Mining rounds after round 0.
        epochs: Whole-network epochs per round.
        initial: Pool images that seed a new negative class (default: `per_round`).
        negative_label: Name of the negative class (single-label runs).
        valid_negatives: Folder of held-out negatives; when given, the whole pool is mined.
        pool_valid_pct: Fraction of the pool held out for validation otherwise.
        patience: Stop after this many rounds without a better validation score.
        lr: Peak learning rate of each round's fine-tuning.
        freeze_epochs: Head-only epochs on cached features before them (pretrained runs).
        batch_size: Images per forward pass when scoring the pool.
        seed: Seed of the split, the round-0 picks and training (default: the run's seed).
        resume: Require an interrupted mining to continue (error when there is none).
        restart: Put the run's files back as they were before mining and start over.
        logger: Trackers for the rounds ("csv", "tensorboard", "mlflow"; None: the run's own,
            which continue its tracked run).
        config: A YAML file of these settings (`pool`, `per_round`, ...); the arguments that
            are not None override it.
        corrections: A corrections CSV of `imgclf review`, applied when mining starts:
            relabelled and excluded labelled images as `train --corrections` applies them,
            images marked negative join the negatives, and pool images excluded or relabelled
            leave the pool (imgclf.commands.mine.corrected).
        console: Deprecated and ignored (messages go to the "imgclf" logger).

    Returns:
        The per-round table, the kept round and why mining stopped.
    """
    _ignore_console(console)
    return _mine.mine(run, pool, per_round=per_round, rounds=rounds, epochs=epochs,
                      initial=initial, negative_label=negative_label,
                      valid_negatives=valid_negatives, pool_valid_pct=pool_valid_pct,
                      patience=patience, lr=lr, freeze_epochs=freeze_epochs, batch_size=batch_size,
                      seed=seed, resume=resume, restart=restart, config=config,
                      logger=parse_words(logger),
                      corrections=None if corrections is None else str(corrections))
