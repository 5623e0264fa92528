"""`imgclf train`: data in, a finished run directory out (the body of `imgclf.api.train`).

Also the steps other commands share: `prepare_data` (load, decode, check and summarise the
data), `finish_run` (predictions, metrics, thresholds, bundle, plots, report) and the small
helpers `_cache_dir`, `uses_all_cores` and `write_report`.

Messages go to the "imgclf" logger; the data summary is logged as a record whose `view` is
"data_summary" (the command line draws it as a table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from imgclf import evaluation, progress
from imgclf.allocator import uses_all_cores
from imgclf.commands import tracking
from imgclf.commands.run import Run
from imgclf.config import TrainConfig, parse_duration
from imgclf.data import corrections, validate
from imgclf.data.summary import summarize
from imgclf.data.cache import decode_all, default_cache_dir, gb_to_bytes
from imgclf.data.datasets import ImageDataset
from imgclf.data.samples import TRAIN, VALID, SampleTable
from imgclf.data.sources import load_table
from imgclf.data.transforms import Preprocess, eval_transform, train_transform
from imgclf.deploy.bundle import save_bundle
from imgclf.deploy.predict import predict_images
from imgclf.errors import DataError, ImageError, ImgclfError
from imgclf.io import atomic_write, atomic_write_json
from imgclf.rundir import new_run_dir, read_rows_csv, write_rows_csv
from imgclf.training import balance, distributed, models, preflight, recipe
from imgclf.training.engine import seed_everything
from imgclf.training.epochs import Best, EpochRow, fine_tuning_check
from imgclf.training.features import load_tensors, save_tensors
from imgclf.training.fine_tune import FitData, FitResult, fine_tune
from imgclf.training.task import Task

log = logging.getLogger(__name__)


def _cache_dir(cfg: TrainConfig) -> Path | None:
    if cfg.cache_dir == "":
        return None
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


@dataclasses.dataclass
class PreparedData:
    """A checked table with its decoded images and targets."""

    table: SampleTable
    task: Task
    decoded: object
    index: dict[Path, int]
    report: object
    summary: object


def prepare_data(cfg: TrainConfig, pre: Preprocess, *, table: SampleTable | None = None,
                 task: Task | None = None) -> PreparedData:
    """Load, decode once (this is also the corrupt-file check), check and summarise the data
    (logged with the view "data_summary")."""
    table = table if table is not None else load_table(cfg)
    decoded, errors, infos = decode_all([s.path for s in table.samples], pre, _cache_dir(cfg),
                                        max_bytes=gb_to_bytes(cfg.cache_max_gb))

    def decoded_result(path: Path):
        # The decode pass above opened each file once (or its index knew it): the check reuses it.
        if path in errors:
            raise ImageError(path, errors[path])
        return infos.get(path)

    table, report = validate.check_table(table, fn=decoded_result, progress=False)
    summary = summarize(table, report)
    summary.balance = balance.resolve(cfg.balance, summary.imbalance_ratio, table.multi_label)
    summary.balance_note = balance.describe(cfg.balance, summary.balance, summary.imbalance_ratio,
                                            table.multi_label)
    log.info(summary.text(), extra={"view": "data_summary", "data": summary})
    smoothing = 0.0 if table.multi_label else float(getattr(cfg, "label_smoothing", 0) or 0)
    task = task or Task(tuple(table.classes), table.multi_label, smoothing)
    index = {p: i for i, p in enumerate(decoded.paths)}
    return PreparedData(table, task, decoded, index, report, summary)


def _datasets(prep: PreparedData, pre: Preprocess) -> FitData:
    tr, va = prep.table.split(TRAIN), prep.table.split(VALID)
    if not tr or not va:
        raise DataError("need both training and validation images; check the split "
                        "(--valid-pct, the split column or the train/ valid/ folders)")
    y_tr, y_va = prep.task.encode(tr), prep.task.encode(va)
    return FitData(
        train=ImageDataset(prep.decoded, [prep.index[s.path] for s in tr], y_tr,
                           train_transform(pre.size)),
        valid=ImageDataset(prep.decoded, [prep.index[s.path] for s in va], y_va,
                           eval_transform(pre.size)),
        y_train=y_tr, y_valid=y_va, balance=prep.summary.balance or "none")


def load_best(run_dir: Path) -> Best:
    """The best epoch of an interrupted run, from checkpoints/best.json and the files it names."""
    best = Best()
    ck = run_dir / "checkpoints"
    meta_p = ck / "best.json"
    if meta_p.is_file():
        try:
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            best.score, best.loss = float(meta["score"]), float(meta["loss"])
            best.epoch, best.stage = int(meta["epoch"]), str(meta["stage"])
            probs_p = ck / Path(meta.get("probs", "best_probs.npy")).name
            best.probs = np.load(probs_p, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImgclfError(f"{ck}: the best epoch's files are damaged ({type(e).__name__}: "
                              f"{e}): delete {ck} and train again") from None
        best.state = load_tensors(ck / Path(meta.get("weights", "best.safetensors")).name)
    return best


@uses_all_cores
def train(data: str | Path | None = None, *, config: TrainConfig | None = None,
          resume: str | Path | None = None, budget_start: float | None = None,
          **options) -> Run | None:
    """`imgclf.api.train` (its docstring documents the arguments): train, write the run."""
    started = time.monotonic() if budget_start is None else float(budget_start)
    state = {}
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ImgclfError(f"{run_dir} is not a run directory (no config.yaml): pass the "
                              "folder printed when the run started")
        cfg = TrainConfig.from_yaml(run_dir / "config.yaml", run=True)
        state_p = run_dir / "checkpoints" / "state.json"
        try:
            state = json.loads(state_p.read_text()) if state_p.is_file() else {}
        except (OSError, ValueError) as e:
            raise ImgclfError(f"{state_p} is damaged ({e}): delete it to resume from the "
                              "start of training") from None
        if state.get("stage") == "finished":
            log.info("%s already finished; nothing to resume", run_dir)
            return Run(run_dir)
    else:
        cfg = dataclasses.replace(config or TrainConfig(), **options)
        if data is not None:
            cfg.data = str(data)
        if not cfg.data:
            raise ImgclfError("no data given: pass a folder of images, e.g. `imgclf train photos/`")
        run_dir = None
    cfg.check()  # a hand-edited config.yaml on --resume too, before anything is written
    # A resumed run replays the plan it recorded; the budget counts from this call.
    budget_s = parse_duration(cfg.time_budget) if resume is None else None
    rank_zero = distributed.is_rank_zero(cfg.num_nodes)
    distributed.check_strategy(cfg)
    if cfg.time_budget and (int(cfg.num_nodes) > 1 or distributed.wants_several_processes(cfg)):
        # Each process would time its own steps and could plan differently, then deadlock.
        raise ImgclfError("--time-budget plans on one process: drop it for multi-process runs "
                          "and give --epochs")
    if distributed.wants_several_processes(cfg):
        distributed.share_cores(cfg)
    # Before anything is written: a missing extra or unreachable store stops the run here.
    with contextlib.nullcontext() if rank_zero else _other_rank(), \
            tracking.connect(cfg, enabled=rank_zero) as tracker:
        return _train(cfg, run_dir, resume, state, rank_zero, tracker,
                      deadline=started + budget_s if budget_s else None)


@contextlib.contextmanager
def _other_rank():
    """Rank 0 speaks for the run: in the other processes of a multi-process run, imgclf logs
    errors only and reports no progress, for the duration of the call."""
    logger = logging.getLogger("imgclf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with progress.reporting(None):
            yield
    finally:
        logger.setLevel(level)


def _train(cfg: TrainConfig, run_dir: Path | None, resume, state: dict, rank_zero: bool,
           tracker: tracking.Tracking, deadline: float | None = None) -> Run | None:
    """The body of `train` once the settings are known and checked."""
    seed_everything(cfg.seed, workers=True, verbose=False)
    corrections.pin(cfg)  # config.yaml records the file's digest; on --resume it must match
    table = load_table(cfg)
    recipe.check_techniques(cfg, table.multi_label)
    if cfg.sizes:
        cfg.size = int(cfg.sizes[-1])  # the bundle's size; config.yaml says so explicitly
    if cfg.stage_epochs:
        cfg.epochs = int(sum(cfg.stage_epochs))
    # Before the model (a weights file that does not fit is a preflight problem) and before the
    # run folder exists (a refused run leaves nothing behind).
    preflight.require(preflight.check(cfg, table, run_dir or Path(cfg.out)))
    model = models.create_model(cfg.model, len(table.classes), pretrained=cfg.pretrained,
                                weights=cfg.weights)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=cfg.size, resize=cfg.resize)
    if run_dir is None and rank_zero:
        run_dir = new_run_dir(cfg.out, cfg.name, cfg.data)
        cfg.name = run_dir.name
        cfg.to_yaml(run_dir / "config.yaml")
    elif run_dir is None:
        # Lightning's launcher starts the other ranks with rank 0's environment, which names
        # the run; under torchrun or SLURM they never need it (rank 0 alone writes).
        run_dir = Path(os.environ.get(distributed.RUN_DIR_ENV) or _scratch_run_dir())
    scratch_run_dir = not rank_zero and run_dir.name.startswith(_SCRATCH_PREFIX)
    if rank_zero and distributed.wants_several_processes(cfg):
        os.environ[distributed.RUN_DIR_ENV] = str(run_dir)
    log.info("Run directory: %s", run_dir)
    tracker.start(run_dir)
    tracker.params(tracking.run_params(cfg))
    prep = prepare_data(cfg, pre, table=table)
    pre, norm_source = _normalisation(cfg, model, pre, prep)
    if rank_zero:
        atomic_write_json(run_dir / "data_summary.json",
                          {"summary": prep.summary.to_dict(), "checks": prep.report.to_dict()})
    _log_skipped(prep.report)
    fit_data = _datasets(prep, pre)
    task = prep.task

    # Rows and the best epoch survive only from stages that finished or checkpointed; a frozen
    # stage that was cut short runs again from its start.
    resumable = resume is not None and state.get("stage") in ("unfrozen", "done")
    rows = [EpochRow(**_row_fields(r)) for r in read_rows_csv(run_dir / "metrics.csv")] \
        if resumable else []
    best = load_best(run_dir) if resumable else Best()

    def on_row(row: EpochRow, improved: bool) -> None:
        if not rank_zero:
            return
        write_rows_csv(run_dir / "metrics.csv", [r.to_dict() for r in rows])
        tracker.row(row.to_dict())
        if improved:
            _save_best(run_dir, best)

    log.info("Training %s on %d images, validating on %d (%s, %d classes)", cfg.model,
             len(fit_data.train), len(fit_data.valid), task.name.replace("_", "-"),
             len(task.classes))
    result = fine_tune(model, task, pre, fit_data, cfg, run_dir, on_row, rows=rows,
                       best=best, resume=state, deadline=deadline)
    if not rank_zero:
        if scratch_run_dir:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        return None
    if result.best.probs is None:
        raise ImgclfError("training stopped before any epoch finished: nothing to save; "
                          f"resume with `imgclf train --resume {run_dir}`")
    finish_run(run_dir, cfg, model, task, pre, prep, result,
               extra={"normalization": {"mean": list(pre.mean), "std": list(pre.std),
                                        "source": norm_source}})
    # Only now is nothing left to redo: a run killed while writing its report resumes into
    # finish_run again ("done" means training finished).
    if not result.interrupted:  # after Ctrl-C, --resume continues from the last checkpoint
        atomic_write_json(run_dir / "checkpoints" / "state.json",
                          {"stage": "finished", "lr": result.lr, "lr_find": result.lr_find})
        summary = Run(run_dir).metrics()
        tracker.finish(summary, {k: summary.get(k) for k in ("task", "classes", "precision")})
    else:
        tracker.close("KILLED")  # --resume continues the same tracked run
    return Run(run_dir)


def _normalisation(cfg: TrainConfig, model, pre: Preprocess,
                   prep: PreparedData) -> tuple[Preprocess, str]:
    """The run's input mean/std (--norm-stats), logged; they go into the bundle with `pre`."""
    cfg_model = model.pretrained_cfg or {}
    model_stats = (tuple(cfg_model.get("mean", pre.mean)), tuple(cfg_model.get("std", pre.std)))
    train_idx = [prep.index[s.path] for s in prep.table.split(TRAIN)]

    class _TrainImages:
        def __len__(self):
            return len(train_idx)

        def __getitem__(self, i):
            return prep.decoded.get(train_idx[i])

    mean, std, source = recipe.resolve_norm_stats(cfg.norm_stats, cfg.pretrained, model_stats,
                                                  _TrainImages())
    words = {"model": "the pretrained model's own", "data": "computed from up to 500 training "
             "images", "imagenet": "ImageNet's", "given": "given by --norm-stats"}[source]
    log.info("Normalisation (%s): mean %s; std %s", words, ", ".join(f"{v:.3f}" for v in mean),
             ", ".join(f"{v:.3f}" for v in std))
    return dataclasses.replace(pre, mean=tuple(mean), std=tuple(std)), source


def _log_skipped(report: validate.CheckReport, limit: int = 20) -> None:
    """Each file left out and why: the first `limit` here, all of them in data_summary.json."""
    issues = report.source_skipped + report.unusable
    for issue in issues[:limit]:
        log.info("  skipped %s: %s", issue.path, issue.reason)
    if len(issues) > limit:
        log.info("  ... and %d more (all listed in data_summary.json)", len(issues) - limit)


_SCRATCH_PREFIX = "imgclf-rank-"


def _scratch_run_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=_SCRATCH_PREFIX)


def _row_fields(r: dict) -> dict:
    base = {"epoch", "stage", "lr", "train_loss", "valid_loss", "seconds"}
    return {"epoch": int(r["epoch"]), "stage": str(r["stage"]), "lr": float(r["lr"]),
            "train_loss": float(r["train_loss"]), "valid_loss": float(r["valid_loss"]),
            "seconds": float(r["seconds"]),
            "metrics": {k: v for k, v in r.items() if k not in base}}


def _save_best(run_dir: Path, best: Best) -> None:
    """The best epoch's weights and probabilities under names of their own, then best.json
    naming them: a kill at any moment leaves a best.json whose files are complete and match."""
    ck = run_dir / "checkpoints"
    weights, probs = f"best-{best.epoch}.safetensors", f"best-{best.epoch}-probs.npy"
    save_tensors(ck / weights, best.state)
    atomic_write(ck / probs, lambda f: np.save(f, best.probs))
    atomic_write_json(ck / "best.json", {"score": best.score, "loss": best.loss,
                                         "epoch": best.epoch, "stage": best.stage,
                                         "weights": weights, "probs": probs})
    for old in [*ck.glob("best-*.safetensors"), *ck.glob("best-*-probs.npy")]:
        if old.name not in (weights, probs):
            old.unlink(missing_ok=True)


def finish_run(run_dir: Path, cfg: TrainConfig, model, task: Task, pre: Preprocess,
               prep: PreparedData, result: FitResult, extra: dict | None = None) -> None:
    """Write predictions, metrics, thresholds, the bundle, plots and the report.

    With `cfg.tta` the bundle predicts with test-time augmentation, so the validation numbers,
    predictions.csv and the report are the TTA ones; metrics.json keeps the plain ones next to
    them under "valid_without_tta".
    """
    valid = prep.table.split(VALID)
    preds = evaluation.Predictions(
        paths=[str(s.path) for s in valid], classes=list(task.classes), probs=result.best.probs,
        targets=task.targets_numpy(task.encode(valid)), multi_label=task.multi_label)
    tta = int(getattr(cfg, "tta", 0) or 0)
    plain_scores = None
    if tta:
        plain_scores = evaluation.metrics(preds)
        images = prep.decoded.subset([prep.index[s.path] for s in valid])
        # The plain view is the kept epoch's validation pass, already done in float32 as
        # predict runs it (the bundle reproduces it to 1e-5): only the other views are run.
        tta_probs = predict_images(model, pre, images, task.multi_label,
                                   batch_size=cfg.batch_size, tta=tta, reduce=cfg.tta_reduce,
                                   plain_probs=result.best.probs)
        preds = dataclasses.replace(preds, probs=tta_probs)
    thresholds = None
    search = None
    if task.multi_label:
        search = evaluation.search_thresholds(preds.probs, preds.targets,
                                              metric=cfg.threshold_metric,
                                              classes=list(task.classes), seed=cfg.seed)
        thresholds = search.thresholds
        preds = dataclasses.replace(preds, thresholds=thresholds)
        _log_threshold_search(search, list(task.classes))
    # Multi-label: every number below is at the tuned thresholds (the best epoch itself was
    # picked at 0.5, before any threshold existed).
    scores = evaluation.metrics(preds)
    n_train = len(prep.table.split(TRAIN))
    summary = {f"valid_{k}": v for k, v in scores.items() if not isinstance(v, (dict, list))}
    summary.update({
        "valid_per_class": scores.get("per_class"),
        "model": cfg.model,
        "task": task.name,
        "classes": list(task.classes),
        # As the options count them: --epochs the whole network trained, --freeze-epochs the head.
        "epochs": sum(r.stage != "frozen" for r in result.rows),
        "freeze_epochs": sum(r.stage == "frozen" for r in result.rows),
        "plan": result.plan,  # why the unfrozen stage ran as long as it did
        "best_epoch": result.best.epoch,
        "best_stage": result.best.stage,
        "lr": result.lr,
        "precision": result.precision,
        "train_seconds": round(result.train_seconds, 2),
        "images_per_second": round(result.train_images_seen / max(result.train_seconds, 1e-9), 2),
        "train_images": n_train,
        "valid_images": len(valid),
        "balance": prep.summary.balance,
        "interrupted": result.interrupted,
    })
    if thresholds is not None:
        summary["threshold"] = float(search.global_threshold)
        summary["thresholds"] = {c: float(t) for c, t in zip(task.classes, thresholds)}
        summary["threshold_kept"] = search.kept
        summary["threshold_metric"] = search.metric
        summary["threshold_reason"] = search.reason
        summary["per_class_thresholds_candidate"] = {
            c: float(t) for c, t in zip(task.classes, search.per_class_thresholds)}
        at_half = evaluation.multi_label_metrics(preds, thresholds=0.5)
        summary["valid_at_threshold_0.5"] = {
            k: at_half[k] for k in ("hamming_accuracy", "zero_one_accuracy", "f1_micro",
                                    "f1_macro")}
    check = fine_tuning_check(result.rows, task.monitor, result.best.stage)
    if check is not None:
        summary["fine_tuning"] = check
        for w in check["warnings"]:
            log.warning("Warning: %s", w)
    summary.update(extra or {})
    if plain_scores is not None:
        summary["tta"] = {"views": tta + 1, "reduce": cfg.tta_reduce}
        summary["valid_without_tta"] = {k: v for k, v in plain_scores.items()
                                        if not isinstance(v, (dict, list))}
    if result.lr_find:
        atomic_write_json(run_dir / "lr_find.json", result.lr_find)  # the report plots it
    write_run_outputs(run_dir, preds, summary, search, model=model, arch=cfg.model,
                      classes=list(task.classes), multi_label=task.multi_label, preprocess=pre,
                      thresholds=None if thresholds is None else [float(t) for t in thresholds],
                      tta={"n": tta, "reduce": cfg.tta_reduce} if tta else None,
                      extra={"trained_on": str(cfg.data)})
    _log_verdict(summary, task, run_dir)


def write_run_outputs(run_dir: Path, preds: evaluation.Predictions, summary: dict, search,
                      **bundle) -> None:
    """Write a finished run's outputs: the one writer `train` and `mine` share.

    predictions.csv, thresholds.json (multi-label), metrics.json, the bundle in model/ (its
    model.json gets the summary's scalar validation numbers as "valid_metrics"), then report.html,
    which draws every figure in plots/ from those files (so each is drawn once per run).

    Args:
        run_dir: The run directory.
        preds: Validation predictions, at the tuned thresholds when multi-label.
        summary: Everything metrics.json holds.
        search: The multi-label threshold search (None for single-label).
        **bundle: `save_bundle`'s arguments after its folder (model, arch, classes, ...); `extra`
            is completed with "valid_metrics".
    """
    preds.to_csv(run_dir / "predictions.csv")
    if search is not None:
        atomic_write_json(run_dir / "thresholds.json", search.to_dict())
    atomic_write_json(run_dir / "metrics.json", summary)
    valid_metrics = {k: v for k, v in summary.items()
                     if k.startswith("valid_") and not isinstance(v, dict)}
    bundle["extra"] = {**(bundle.get("extra") or {}), "valid_metrics": valid_metrics}
    save_bundle(run_dir / "model", **bundle)
    write_report(run_dir)


def _log_threshold_search(search: evaluation.ThresholdSearch, classes: list[str]) -> None:
    """Both candidates of the multi-label threshold search, which was kept and why."""
    words = {"zero_one": "exact-match accuracy", "hamming": "Hamming accuracy",
             "f1_macro": "macro F1"}[search.metric]
    per = ", ".join(f"{c} {t:.2f}" for c, t in zip(classes, search.per_class_thresholds))
    log.info("Decision thresholds maximising validation %s: global %.2f -> %.4f; per-class "
             "(%s) -> %.4f (chosen and scored on the same images)", words,
             search.global_threshold, search.global_score, per, search.per_class_score)
    log.info(search.reason)


def write_report(run_dir: Path) -> Path | None:
    """report.html for a run (skipped with a note when the report module is unavailable)."""
    try:
        from imgclf.report.html import write_report as _write  # lazy: the report is optional
    except ImportError:
        return None
    return _write(Run(run_dir))


def _log_verdict(summary: dict, task: Task, run_dir: Path) -> None:
    keys = (["valid_zero_one_accuracy", "valid_hamming_accuracy", "valid_f1_macro", "valid_map"]
            if task.multi_label else ["valid_accuracy", "valid_balanced_accuracy",
                                      "valid_f1_macro"])
    shown = "  ".join(f"{k[6:]}={summary[k]:.4f}" for k in keys if summary.get(k) is not None)
    if summary.get("interrupted"):
        log.warning("Stopped early after %.1fs; kept the best epoch so far: %s\nContinue with: "
                    "imgclf train --resume %s", summary["train_seconds"], shown, run_dir)
    else:
        log.info("Done in %.1fs: %s", summary["train_seconds"], shown)
    if summary.get("valid_without_tta"):
        plain = summary["valid_without_tta"]
        log.info("  (with TTA, %d views combined by %s; without TTA: %s)",
                 summary["tta"]["views"], summary["tta"]["reduce"], "  ".join(
                     f"{k[6:]}={plain[k[6:]]:.4f}" for k in keys if plain.get(k[6:]) is not None))
    log.info("Bundle: %s", run_dir / "model")
    if (run_dir / "report.html").is_file():
        log.info("Report: %s", run_dir / "report.html")
