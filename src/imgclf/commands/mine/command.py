"""`imgclf mine`: the command that runs the rounds and makes the best one the run's bundle."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from imgclf import evaluation
from imgclf.commands import tracking
from imgclf.commands import train as train_cmd
from imgclf.commands.mine import corrected
from imgclf.commands.mine.pool import _list_images, better, score_pool, split_pool
from imgclf.commands.mine.rounds import (_decode_negatives, _draw_seeds, _epoch_rows, _evaluate,
                                         _predictions, _round_lr, _rounds_table, _Setup,
                                         _train_round, _validation_probs, round_metrics)
from imgclf.commands.mine.state import (MANIFEST_VERSION, MineOptions, MiningResult,
                                        _load_weights, _mining_dir, _prune_weights, _read_json,
                                        _resolve_options, _restore_original, _save_manifest,
                                        _save_weights, _snapshot_original, options_from_file)
from imgclf.commands.run import Run
from imgclf.config import TrainConfig
from imgclf.data.cache import decode_all
from imgclf.data.samples import TRAIN, VALID
from imgclf.data.sources import load_table
from imgclf.deploy.bundle import load as load_bundle
from imgclf.errors import DataError, ImgclfError, display_path
from imgclf.io import atomic_write_json
from imgclf.rundir import read_rows_csv, write_rows_csv
from imgclf.training import models
from imgclf.training.task import Task

log = logging.getLogger(__name__)

@train_cmd.uses_all_cores
def mine(run: str | Path, pool: str | Path | None = None, *, resume: bool = False,
         restart: bool = False, config: str | Path | None = None, **options) -> MiningResult:
    """Hard negative mining on a trained run; the best round's model becomes its bundle.

    `imgclf.api.mine` documents the arguments; `options` are fields of `MineOptions` (a
    path-valued one may be a Path); `config` is a YAML file of them, which the options that are
    not None override. Rerunning on a run that was interrupted continues from its
    manifest: finished rounds are not redone, and a round whose picks were recorded is trained
    on the same picks.

    Raises:
        TypeError: An option that `MineOptions` does not have.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(MineOptions)})
    if unknown:
        raise TypeError(f"mine() got unexpected keyword arguments: {', '.join(unknown)}")
    if config is not None:
        from_file = options_from_file(config)
        pool = pool if pool is not None else from_file.pop("pool", None)
        options = {**from_file, **{k: v for k, v in options.items() if v is not None}}
    run_dir = Path(run)
    Run(run_dir)
    mdir = _mining_dir(run_dir)
    manifest = _read_json(mdir / "manifest.json")
    if restart and manifest is not None:
        _restore_original(run_dir)
        shutil.rmtree(mdir)
        manifest = None
    if manifest is None and resume:
        raise ImgclfError(f"{run_dir} has no mining to resume: start one with "
                          f"`imgclf mine {run_dir} --pool DIR`")
    if manifest is None and pool is None:
        raise ImgclfError("pass --pool DIR: a folder of images that contain none of the classes")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    given["pool"] = None if pool is None else str(pool)
    if given.get("seed") is None and manifest is None:
        given["seed"] = cfg.seed
    opts = _resolve_options(manifest, given)
    opts.check()
    # The run's trackers (or --logger's) continue the tracked run with the mining rounds.
    logger = opts.logger if opts.logger is not None else cfg.logger
    with tracking.connect(dataclasses.replace(cfg, logger=logger)) as tracker:
        tracker.start(run_dir)
        tracker.params({f"mine.{k}": v for k, v in dataclasses.asdict(opts).items()})
        result = _start(run_dir, cfg, opts, manifest)
        tracking.log_new_rows(tracker, run_dir, stage_prefix="mining")
    return result


def _start(run_dir: Path, cfg: TrainConfig, opts: MineOptions,
           manifest: dict | None) -> MiningResult:
    """Set mining up (or pick it up from the manifest) and run the rounds."""
    mdir = _mining_dir(run_dir)
    if manifest is None:
        for folder, flag in ((opts.pool, "--pool"), (opts.valid_negatives, "--valid-negatives")):
            if folder is not None and not Path(folder).is_dir():
                raise DataError(f"{display_path(folder)} is not a folder: pass {flag} a folder "
                                "of images that contain none of the classes")
        _snapshot_original(run_dir)
        (mdir / "pool.json").unlink(missing_ok=True)  # from a start that never got a manifest
    s = _setup(run_dir, cfg, opts)
    if manifest is None:
        manifest = {"version": MANIFEST_VERSION, "options": dataclasses.asdict(opts),
                    "classes": list(s.task.classes),
                    "original_classes": list(s.original.classes),
                    "multi_label": s.task.multi_label, "added_class": s.added_class,
                    "baseline": None, "rounds": [], "best_round": None, "stop_reason": None,
                    "unreadable": {}}
    manifest["options"] = dataclasses.asdict(opts)

    model = s.original.model
    if not manifest["rounds"]:
        # The model before mining: its numbers on the new validation set, and what it calls
        # the round-0 seeds (it has no negative class yet, so every image gets a class).
        probs = _validation_probs(s, model, opts.batch_size)
        pad = np.zeros((len(probs), len(s.task.classes) - probs.shape[1]), probs.dtype)
        preds = _predictions(s, np.concatenate([probs, pad], axis=1),
                             s.original.thresholds if s.task.multi_label else None)
        base = round_metrics(preds, len(s.prep.table.split(VALID)), s.negative_index)
        manifest["baseline"] = {k: base[k] for k in ("fp_rate_V", "positive_accuracy",
                                                      "overall_accuracy", "valid_loss")}
        seeds = _draw_seeds(s, model, 0 if _has_negatives(s) else opts.initial)
        seeds = corrected.seeds(s.marked_negatives) + seeds  # marked negative in a review
        manifest["rounds"].append({"round": 0, "status": "mined", "mined": seeds,
                                   "pool_scored": None, "pool_false_positives": None})
    _save_manifest(mdir, manifest)
    if s.added_class:
        models.grow_classifier(model)
    return _run_rounds(run_dir, s, model, manifest, _round_lr(run_dir, cfg, opts))


def _setup(run_dir: Path, cfg: TrainConfig, opts: MineOptions) -> _Setup:
    """The original model, the checked labelled images, the pool split and V."""
    mdir = _mining_dir(run_dir)
    original = load_bundle(mdir / "original" / "model")
    table = load_table(cfg)
    split = _read_json(mdir / "pool.json")
    if split is None:
        in_table = {Path(x.path).resolve() for x in table.samples}
        pool_paths = [p for p in _list_images(opts.pool, "--pool") if p not in in_table]
        listed_valid = None if opts.valid_negatives is None else [
            p for p in _list_images(opts.valid_negatives, "--valid-negatives") if p not in in_table]
        known = pool_paths + (listed_valid or [])
    else:
        known = [Path(p) for k in ("mining", "valid", "removed") for p in split.get(k, [])]
    fix = corrected.apply(table, opts.corrections, opts.negative_label, original.classes,
                          known, split)
    table = fix.table
    if list(table.classes) != list(original.classes):
        raise ImgclfError(
            f"{run_dir}: the data now has classes {table.classes}, but the model was trained on "
            f"{original.classes}: mine with the data the run was trained on")
    multi = original.multi_label
    added = not multi and opts.negative_label not in original.classes
    classes = list(original.classes) + ([opts.negative_label] if added else [])
    task = Task(tuple(classes), multi)
    prep = train_cmd.prepare_data(cfg, original.preprocess, table=table,
                                  task=Task(tuple(original.classes), multi))
    cache_dir = train_cmd._cache_dir(cfg)

    if split is None:
        pool_paths = [p for p in pool_paths if str(p) not in fix.pool_removed]
        if listed_valid is not None:
            valid = [p for p in listed_valid if str(p) not in fix.pool_removed]
            held = set(valid)
            mining_part = [p for p in pool_paths if p not in held]
        else:
            mining_part, valid = split_pool(pool_paths, opts.pool_valid_pct, opts.seed)
        if not mining_part:
            raise DataError(f"{display_path(opts.pool)} leaves no images to mine after the "
                            "held-out part: add images to the pool or lower --pool-valid-pct")
        split = {"pool": opts.pool, "mining": [str(p) for p in mining_part],
                 "valid": [str(p) for p in valid] + fix.valid_negatives}
        if opts.corrections:
            split.update(corrections_sha256=fix.digest, removed=sorted(fix.pool_removed),
                         marked_negatives=fix.train_negatives)
        atomic_write_json(mdir / "pool.json", split)

    positive_digests = set(prep.decoded.digests)
    valid_neg, errors, _ = decode_all([Path(p) for p in split["valid"]], original.preprocess,
                                      cache_dir, progress=False)
    for p, why in errors.items():
        log.warning("skipped %s: %s", display_path(p), why)
    # A held-out negative identical to a labelled image would be scored against two labels.
    usable = [i for i, d in enumerate(valid_neg.digests) if d not in positive_digests]
    if len(usable) < len(valid_neg):
        log.warning("%d held-out pool images are copies of labelled images; they are left out",
                    len(valid_neg) - len(usable))
    valid_neg = valid_neg.subset(usable)
    if not len(valid_neg):
        raise DataError("no usable held-out negatives (V): pass --valid-negatives DIR or a "
                        "larger pool")
    return _Setup(cfg=cfg, opts=opts, pre=original.preprocess, task=task,
                  negative_index=None if multi else classes.index(opts.negative_label),
                  added_class=added, prep=prep, valid_neg=valid_neg,
                  known_digests=positive_digests | set(valid_neg.digests), cache_dir=cache_dir,
                  mining_paths=[Path(p) for p in split["mining"]], original=original,
                  marked_negatives=list(split.get("marked_negatives", [])))


def _has_negatives(s: _Setup) -> bool:
    """Whether training already holds negatives (then round 0 adds none and only evaluates)."""
    train = s.prep.table.split(TRAIN)
    if s.task.multi_label:
        return any(not x.labels for x in train)
    return not s.added_class and any(x.labels == (s.opts.negative_label,) for x in train)


def _mine_round(s: _Setup, model, manifest: dict, k: int, thresholds) -> dict | str:
    """Score what is left of U and record the round's picks; or why mining stops."""
    unreadable = set(manifest.get("unreadable", {}))
    taken = {x["path"] for r in manifest["rounds"] for x in r["mined"]}
    remaining = [p for p in s.mining_paths if str(p) not in taken | unreadable]
    if not remaining:
        return "the mining pool is used up"
    train_neg, _ = _decode_negatives(s, sorted(taken - unreadable))
    score = score_pool(model, s.pre, remaining, s.task.multi_label, s.negative_index,
                       thresholds, list(s.task.classes), s.opts.per_round,
                       s.known_digests | set(train_neg.digests), s.cache_dir, s.opts.batch_size,
                       description=f"Round {k}: scoring {len(remaining)} pool images")
    manifest.setdefault("unreadable", {}).update(score.unreadable)
    if not score.picks:
        return "no false positives left in the mining pool"
    return {"round": k, "status": "mined", "mined": score.picks, "pool_scored": score.scored,
            "pool_false_positives": score.false_positives}


def _run_rounds(run_dir: Path, s: _Setup, model, manifest: dict, lr: float) -> MiningResult:
    mdir = _mining_dir(run_dir)
    opts = s.opts
    done = [r for r in manifest["rounds"] if r["status"] == "done"]
    reason = manifest.get("stop_reason")
    more_rounds = bool(reason) and reason.startswith("reached") and len(done) - 1 < opts.rounds
    if reason and not more_rounds:
        if manifest.get("finished"):
            log.info("Mining of %s already finished: %s (--restart mines again from the start)",
                     run_dir, reason)
        else:  # stopped, but interrupted while writing the results
            _finish(run_dir, s, model, manifest)
        return _result(run_dir, manifest)
    manifest["stop_reason"], manifest["finished"] = None, False
    thresholds = None
    if done:
        # Continue from the last finished round's weights.
        _load_weights(mdir / done[-1]["weights"], model)
        last_thr = done[-1].get("thresholds")
        thresholds = None if last_thr is None else np.asarray(last_thr)
    model.eval()

    k = len(done)
    while True:
        if k >= len(manifest["rounds"]):
            if k > opts.rounds:
                manifest["stop_reason"] = f"reached --rounds {opts.rounds}"
                break
            entry = _mine_round(s, model, manifest, k, thresholds)
            if isinstance(entry, str):
                manifest["stop_reason"] = entry
                break
            manifest["rounds"].append(entry)
            _save_manifest(mdir, manifest)
        pending = manifest["rounds"][k]

        t0 = time.perf_counter()
        negatives = [x["path"] for r in manifest["rounds"][:k + 1] for x in r["mined"]]
        train_neg, errors = _decode_negatives(s, negatives)
        for p, why in errors.items():
            log.warning("skipped %s: %s", display_path(p), why)
        log.info("Round %d: %d new negatives, %d in training", k, len(pending["mined"]),
                 len(train_neg))
        epochs: list[dict] = []
        if pending["mined"]:
            epochs, interrupted = _train_round(s, model, train_neg, lr, k, mdir / "work")
            if interrupted:
                log.warning("Interrupted in round %d: rerun the same command to continue", k)
                raise KeyboardInterrupt
        metrics, _, search = _evaluate(s, model)
        thresholds = None if search is None else search.thresholds
        best_k = manifest["best_round"]
        previous = None if best_k is None else manifest["rounds"][best_k]["metrics"]
        improved = better(metrics, previous)
        weights = f"round_{k}.safetensors"
        _save_weights(mdir / weights, model)
        pending.update(status="done", metrics=metrics, epochs=epochs, weights=weights,
                       thresholds=None if thresholds is None else [float(t) for t in thresholds],
                       improved=improved, seconds=round(time.perf_counter() - t0, 2))
        if improved:
            manifest["best_round"] = k
        _save_manifest(mdir, manifest)
        _prune_weights(mdir, {weights, manifest["rounds"][manifest["best_round"]]["weights"]})
        log.info("Round %d: false-positive rate on held-out negatives %.3f, positive accuracy "
                 "%.3f, overall %.3f%s", k, metrics["fp_rate_V"], metrics["positive_accuracy"],
                 metrics["overall_accuracy"], "  (best so far)" if improved else "")
        since_best = k - manifest["best_round"]
        if since_best >= opts.patience:
            manifest["stop_reason"] = (f"no better validation score for {since_best} "
                                       f"round{'s' if since_best > 1 else ''} (--patience "
                                       f"{opts.patience})")
            break
        k += 1

    _save_manifest(mdir, manifest)
    _finish(run_dir, s, model, manifest)
    return _result(run_dir, manifest)


def _result(run_dir: Path, manifest: dict) -> MiningResult:
    return MiningResult(run=Run(run_dir), rounds=_rounds_table(manifest),
                        best_round=manifest["best_round"], stop_reason=manifest["stop_reason"],
                        baseline=manifest.get("baseline", {}))


def _finish(run_dir: Path, s: _Setup, model, manifest: dict) -> None:
    """The best round's model becomes the run's bundle; metrics, predictions, plots, report."""
    mdir = _mining_dir(run_dir)
    best = manifest["rounds"][manifest["best_round"]]
    _load_weights(mdir / best["weights"], model)
    model.eval()
    _, preds, search = _evaluate(s, model)
    thresholds = None if search is None else search.thresholds
    scores = evaluation.metrics(preds)
    rounds = _rounds_table(manifest)
    original = _read_json(mdir / "original" / "metrics.json") or {}
    summary = {k: v for k, v in original.items() if not k.startswith("valid_")}
    summary = {**{f"valid_{k}": v for k, v in scores.items() if not isinstance(v, (dict, list))},
               "valid_per_class": scores.get("per_class"), **summary}
    bm = best["metrics"]
    summary.update({
        "classes": list(s.task.classes),
        "valid_images": len(preds.paths),
        "train_images": len(s.prep.table.split(TRAIN)) + sum(r["n_mined"] for r in rounds
                                                              if r["round"] <= best["round"]),
        "valid_fp_rate_negatives": bm["fp_rate_V"],
        "valid_positive_accuracy": bm["positive_accuracy"],
        "mining": {
            "pool": s.opts.pool, "negative_label": None if s.task.multi_label
            else s.opts.negative_label, "added_class": s.added_class,
            "best_round": best["round"], "stop_reason": manifest["stop_reason"],
            "baseline": manifest.get("baseline"),
            "rounds": [{k: v for k, v in r.items() if k not in ("mined", "confusion")}
                       for r in rounds]},
    })
    if thresholds is not None:
        summary["thresholds"] = {c: float(t) for c, t in zip(s.task.classes, thresholds)}
        summary["threshold"] = float(search.global_threshold)
        summary["threshold_kept"] = search.kept
    atomic_write_json(mdir / "rounds.json", {
        "classes": list(s.task.classes), "negative_label": s.opts.negative_label,
        "multi_label": s.task.multi_label, "best_round": best["round"],
        "stop_reason": manifest["stop_reason"], "baseline": manifest.get("baseline"),
        "rounds": rounds})
    original_rows = read_rows_csv(mdir / "original" / "metrics.csv")
    base_epoch = 1 + max((int(r["epoch"]) for r in original_rows), default=-1)
    rows = original_rows + _epoch_rows(manifest, base_epoch, s.task.monitor)
    write_rows_csv(run_dir / "metrics.csv", rows)
    original_meta = s.original.meta
    train_cmd.write_run_outputs(
        run_dir, preds, summary, search, model=model, arch=s.cfg.model,
        classes=list(s.task.classes), multi_label=s.task.multi_label, preprocess=s.pre,
        thresholds=None if thresholds is None else [float(t) for t in thresholds],
        tta=s.original.tta,
        extra={"trained_on": original_meta.get("trained_on", str(s.cfg.data)),
               "negatives": {"pool": s.opts.pool, "best_round": best["round"],
                             "label": None if s.task.multi_label else s.opts.negative_label}})
    log.info("Hard negative mining", extra={"view": "mining_rounds", "data": {
        "rounds": rounds, "baseline": manifest.get("baseline"), "best_round": best["round"]}})
    log.info("* kept: round %d", best["round"])
    log.info("Stopped: %s. Kept round %d as %s (classes: %s)", manifest["stop_reason"],
             best["round"], run_dir / "model", ", ".join(s.task.classes))
    # Only after the report: interrupted before this, a rerun finishes again.
    manifest["finished"] = True
    _save_manifest(mdir, manifest)
