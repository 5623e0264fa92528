"""One mining round: its training data, its fine-tuning, its evaluation, and the rounds table
(as data: the command line draws it)."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgclf import evaluation
from imgclf.commands.mine.pool import _predict
from imgclf.commands.mine.state import MineOptions, _mining_dir, _read_json
from imgclf.config import TrainConfig
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.datasets import ImageDataset
from imgclf.data.samples import TRAIN, VALID, Sample
from imgclf.data.transforms import eval_transform, train_transform
from imgclf.training import balance, fine_tune
from imgclf.training.engine import seed_everything
from imgclf.training.epochs import Best
from imgclf.training.task import Task


@dataclass
class _Setup:
    """Everything the rounds share: the task, the images and where they come from."""

    cfg: TrainConfig
    opts: MineOptions
    pre: object
    task: Task
    negative_index: int | None
    added_class: bool
    prep: object
    valid_neg: DecodedImages
    known_digests: set[str]
    cache_dir: Path | None
    mining_paths: list[Path]
    original: object
    marked_negatives: list[str] = field(default_factory=list)  # training images, by a review

    def negative_sample(self, path: str | Path, split: str) -> Sample:
        labels = () if self.task.multi_label else (self.opts.negative_label,)
        return Sample(Path(path), labels, split)


def _fit_data(s: _Setup, train_neg: DecodedImages) -> fine_tune.FitData:
    """Training: positives + mined negatives; validation: positives' validation split + V."""
    from torch.utils.data import ConcatDataset

    prep, task = s.prep, s.task
    tr, va = prep.table.split(TRAIN), prep.table.split(VALID)
    neg_tr = [s.negative_sample(p, TRAIN) for p in train_neg.paths]
    neg_va = [s.negative_sample(p, VALID) for p in s.valid_neg.paths]
    y_tr = torch.cat([task.encode(tr), task.encode(neg_tr)])
    y_va = torch.cat([task.encode(va), task.encode(neg_va)])
    aug, plain = train_transform(s.pre.size), eval_transform(s.pre.size)
    train = ConcatDataset([
        ImageDataset(prep.decoded, [prep.index[x.path] for x in tr], task.encode(tr), aug),
        ImageDataset(train_neg, range(len(train_neg)), task.encode(neg_tr), aug)])
    valid = ConcatDataset([
        ImageDataset(prep.decoded, [prep.index[x.path] for x in va], task.encode(va), plain),
        ImageDataset(s.valid_neg, range(len(s.valid_neg)), task.encode(neg_va), plain)])
    return fine_tune.FitData(train=train, valid=valid, y_train=y_tr, y_valid=y_va,
                            balance=_balance_mode(s, y_tr))


def _balance_mode(s: _Setup, y_train: torch.Tensor) -> str:
    """The run's imbalance setting, resolved on the training set as mining changed it."""
    counts = balance.class_counts(y_train, len(s.task.classes)).float()
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else None
    return balance.resolve(getattr(s.cfg, "balance", "none"), ratio, s.task.multi_label)


def _validation_probs(s: _Setup, model, batch_size: int) -> np.ndarray:
    va = s.prep.table.split(VALID)
    pos = s.prep.decoded.subset([s.prep.index[x.path] for x in va])
    return np.concatenate([_predict(model, s.pre, pos, s.task.multi_label, batch_size),
                           _predict(model, s.pre, s.valid_neg, s.task.multi_label, batch_size)])


def _validation_targets(s: _Setup) -> np.ndarray:
    va = s.prep.table.split(VALID)
    neg = [s.negative_sample(p, VALID) for p in s.valid_neg.paths]
    return s.task.targets_numpy(torch.cat([s.task.encode(va), s.task.encode(neg)]))


def _predictions(s: _Setup, probs: np.ndarray, thresholds=None) -> evaluation.Predictions:
    va = s.prep.table.split(VALID)
    return evaluation.Predictions(
        paths=[str(x.path) for x in va] + [str(p) for p in s.valid_neg.paths],
        classes=list(s.task.classes), probs=probs, targets=_validation_targets(s),
        multi_label=s.task.multi_label, thresholds=thresholds)


def round_metrics(preds: evaluation.Predictions, n_positive: int,
                  negative_index: int | None) -> dict:
    """The numbers of one round on validation positives (the first `n_positive` rows) and the
    held-out negatives V (the rest).

    Returns:
        fp_rate_V (share of V given a class), positive_accuracy, overall_accuracy, valid_loss,
        n_valid_positives, n_valid_negatives, and the confusion matrix (single-label [C, C];
        multi-label per class [[tn, fp], [fn, tp]]).
    """
    correct = preds.correct
    if preds.multi_label:
        flagged = preds.predicted[n_positive:].any(axis=1)
        cm = evaluation.multilabel_confusion(preds)
    else:
        flagged = preds.predicted[n_positive:] != negative_index
        cm = evaluation.confusion(preds)
    n_neg = len(preds.paths) - n_positive
    return {
        "fp_rate_V": float(flagged.mean()) if n_neg else float("nan"),
        "positive_accuracy": float(correct[:n_positive].mean()) if n_positive else float("nan"),
        "overall_accuracy": float(correct.mean()),
        "valid_loss": float(preds.losses.mean()),
        "n_valid_positives": int(n_positive),
        "n_valid_negatives": int(n_neg),
        "confusion": np.asarray(cm).tolist(),
    }


def _evaluate(s: _Setup, model) -> tuple[dict, evaluation.Predictions, object | None]:
    """The round's metrics, predictions and (multi-label) threshold search; thresholds are
    searched on the validation set, as training does."""
    probs = _validation_probs(s, model, s.opts.batch_size)
    preds = _predictions(s, probs)
    search = None
    if s.task.multi_label:
        search = evaluation.search_thresholds(probs, preds.targets, metric=s.cfg.threshold_metric,
                                              classes=list(s.task.classes), seed=s.opts.seed)
        preds = dataclasses.replace(preds, thresholds=search.thresholds)
    n_pos = len(s.prep.table.split(VALID))
    return round_metrics(preds, n_pos, s.negative_index), preds, search


def _round_lr(run_dir: Path, cfg: TrainConfig, opts: MineOptions) -> float:
    """The rate for the fine-tune recipe: by default the whole-network stage peaks where the
    run's own did (half the finder's rate after a frozen stage, which the recipe halves itself
    when the round has a frozen stage too)."""
    if opts.lr is not None:
        return float(opts.lr)
    original = _read_json(_mining_dir(run_dir) / "original" / "metrics.json") or {}
    lr = original.get("lr")
    if lr is None:
        lr = cfg.lr if cfg.lr != "auto" else 1e-3
    whole_network = float(lr) / 2 if cfg.pretrained and cfg.freeze_epochs > 0 else float(lr)
    return whole_network * 2 if cfg.pretrained and opts.freeze_epochs > 0 else whole_network


def _train_round(s: _Setup, model, train_neg: DecodedImages, lr: float, k: int,
                 work: Path) -> tuple[list[dict], bool]:
    """Fine-tune from the model's current weights; it ends holding the round's best epoch.

    Returns:
        The round's metrics.csv rows, and whether training was interrupted.
    """
    frozen = s.opts.freeze_epochs > 0 and s.cfg.pretrained  # the recipe's frozen-stage rule
    if s.opts.epochs == 0 and not frozen:
        return [], False
    shutil.rmtree(work, ignore_errors=True)
    seed_everything(s.opts.seed + k, workers=True, verbose=False)
    # One process on one device: a round is small, and a multi-process launcher would start the
    # whole `mine` command again in every process.
    single = {k: v for k, v in {"devices": 1, "num_nodes": 1, "strategy": "auto"}.items()
              if hasattr(s.cfg, k)}
    cfg = dataclasses.replace(s.cfg, epochs=s.opts.epochs, freeze_epochs=s.opts.freeze_epochs,
                              lr=lr, **single)
    # Checkpoints go to a scratch folder in mining/, never over the run's own resume state.
    result = fine_tune.fine_tune(model, s.task, s.pre, _fit_data(s, train_neg), cfg, work,
                                lambda row, improved: None, rows=[], best=Best(),
                                resume={})
    shutil.rmtree(work, ignore_errors=True)
    return [r.to_dict() for r in result.rows], result.interrupted


def _decode_negatives(s: _Setup, paths: list[str]) -> tuple[DecodedImages, dict]:
    decoded, errors, _ = decode_all([Path(p) for p in paths], s.pre, s.cache_dir, progress=False)
    return decoded, {str(p): why for p, why in errors.items()}


def _draw_seeds(s: _Setup, model, n: int) -> list[dict]:
    """`n` random usable images of U (seeded), with what the model before mining called them."""
    order = np.random.default_rng(s.opts.seed).permutation(len(s.mining_paths))
    picks: list[dict] = []
    seen = set(s.known_digests)
    step = max(n, 16)
    for start in range(0, len(order) if n else 0, step):
        decoded, _, _ = decode_all([s.mining_paths[i] for i in order[start:start + step]],
                                   s.pre, s.cache_dir, progress=False)
        fresh = []
        for i, d in enumerate(decoded.digests):
            if d not in seen and len(picks) + len(fresh) < n:
                seen.add(d)
                fresh.append(i)
        if fresh:
            sub = decoded.subset(fresh)
            probs = _predict(model, s.pre, sub, s.task.multi_label, s.opts.batch_size)
            picks += [{"path": str(p), "predicted": s.task.classes[int(row.argmax())],
                       "confidence": float(row.max())} for p, row in zip(sub.paths, probs)]
        if len(picks) >= n:
            break
    return picks


def _epoch_rows(manifest: dict, base_epoch: int, monitor: str) -> list[dict]:
    """metrics.csv rows of the mining rounds, numbered after the run's own epochs; each round's
    last row also carries the round's summary numbers."""
    rows, epoch = [], base_epoch
    for r in manifest["rounds"]:
        if r.get("status") != "done":
            continue
        m = r["metrics"]
        own = [dict(x) for x in r.get("epochs", [])] or [{
            "lr": float("nan"), "train_loss": float("nan"), "valid_loss": m["valid_loss"],
            monitor: m["overall_accuracy"], "seconds": 0.0}]
        for x in own:
            x.update(epoch=epoch, stage=f"mining round {r['round']}", round=r["round"])
            epoch += 1
        own[-1].update(fp_rate_V=m["fp_rate_V"], positive_accuracy=m["positive_accuracy"],
                       overall_accuracy=m["overall_accuracy"])
        order = ["epoch", "stage", "round", "lr", "train_loss", "valid_loss"]
        rows += [{**{k: x[k] for k in order if k in x},
                  **{k: v for k, v in x.items() if k not in order}} for x in own]
    return rows


def _round_row(r: dict, n_train_negatives: int) -> dict:
    m = r["metrics"]
    return {"round": r["round"], "fp_rate_V": m["fp_rate_V"],
            "positive_accuracy": m["positive_accuracy"],
            "overall_accuracy": m["overall_accuracy"], "valid_loss": m["valid_loss"],
            "n_mined": len(r["mined"]), "n_train_negatives": n_train_negatives,
            "pool_scored": r.get("pool_scored"),
            "pool_false_positives": r.get("pool_false_positives"),
            "mined": r["mined"], "confusion": m["confusion"], "seconds": r.get("seconds"),
            "improved": r.get("improved", False)}


def _rounds_table(manifest: dict) -> list[dict]:
    rows, n_neg = [], 0
    for r in manifest["rounds"]:
        if r.get("status") == "done":
            n_neg += len(r["mined"])
            rows.append(_round_row(r, n_neg))
    return rows
