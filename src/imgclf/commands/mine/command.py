"""Hard negative mining: teach a trained classifier what none of its classes looks like.

A softmax model must call every image one of its classes, so a photo of none of them gets a
confident wrong label. Mining adds a `negative` class (multi-label: an empty label set, no new
class), scores a pool of unlabelled images that contain none of the classes, trains on the most
confidently wrong ones, and repeats:

    round 0   grow the head by one class (trained rows kept) and seed it with `initial` random
              pool images, fine-tune, evaluate
    round k   score the mining part U of the pool with round k-1's model, add its `per_round`
              most confident false positives to training, fine-tune from round k-1's weights,
              evaluate

The pool is split once (seeded) into U and a held-out part V that joins the validation set, so
the false-positive rate on V measures what mining bought on images it never trained on. The best
round (validation accuracy over positives + V) becomes the run's bundle.

Everything lives in `<run>/mining/`: manifest.json (settings; per round the picks, metrics and
weights file; rewritten atomically after every step, so rerunning the command continues where an
interruption stopped), pool.json (the U/V split), original/ (the run's files before mining),
round_<k>.safetensors and rounds.json (the per-round table the report renders). User images are
only read, never copied, moved or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgclf import evaluation, models, training
from imgclf.config import TrainConfig
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.samples import TRAIN, VALID, Sample
from imgclf.errors import DataError, ImgclfError, display_path
from imgclf.io import atomic_write_bytes, atomic_write_json
from imgclf.run import Run, read_rows_csv, write_rows_csv
from imgclf.training.task import Task

MINING_DIR = "mining"
MANIFEST_VERSION = 1
# Pool images decoded and scored at a time: memory stays bounded whatever the pool's size.
SCORE_CHUNK = 512
# Files of a run that mining rewrites; copied to mining/original/ before the first round.
_RUN_FILES = ("model/model.json", "model/weights.safetensors", "metrics.json", "metrics.csv",
              "predictions.csv", "thresholds.json")
# Settings that define the pool split and round 0; a rerun must not change them.
_FIXED = ("pool", "valid_negatives", "pool_valid_pct", "seed", "negative_label", "initial")


@dataclass
class MineOptions:
    """Settings of `imgclf mine` (the CLI flags have the same names with dashes).

    Attributes:
        pool: Folder of unlabelled images that contain none of the classes.
        per_round: Hard negatives added to training per round.
        rounds: Mining rounds after round 0.
        epochs: Whole-network epochs per round, after the head-only ones.
        initial: Pool images that seed a new negative class in round 0 (None: `per_round`).
        negative_label: Name of the negative class (single-label runs).
        valid_negatives: Folder of held-out negatives V; when given, the whole pool is mined.
        pool_valid_pct: Fraction of the pool held out as V when `valid_negatives` is None.
        patience: Stop after this many rounds without a better validation score.
        lr: Peak learning rate given to the fine-tune recipe (None: the rates of the run's own
            whole-network stage).
        freeze_epochs: Head-only epochs on cached body features before each round's
            whole-network epochs (the training recipe's frozen stage; pretrained runs only).
            The head learns the negative class without moving the body, which keeps the
            positive classes' accuracy; the whole-network epochs then remove the false
            positives a linear head on fixed features cannot (measured in
            benchmarks/mining.py). Both 0: rounds only evaluate.
        batch_size: Images per forward pass when scoring the pool.
        seed: Seed of the U/V split, the round-0 picks and training (None: the run's seed).
    """

    pool: str
    per_round: int = 10
    rounds: int = 3
    epochs: int = 2
    initial: int | None = None
    negative_label: str = "negative"
    valid_negatives: str | None = None
    pool_valid_pct: float = 0.2
    patience: int = 2
    lr: float | None = None
    freeze_epochs: int = 1
    batch_size: int = 64
    seed: int = 42

    def check(self) -> None:
        """Raise ImgclfError on values that cannot work, naming the flag."""
        if self.per_round < 1:
            raise ImgclfError(f"--per-round must be at least 1, not {self.per_round}")
        if self.rounds < 0 or self.epochs < 0 or self.freeze_epochs < 0:
            raise ImgclfError("--rounds, --epochs and --freeze-epochs cannot be negative")
        if self.initial is not None and self.initial < 0:
            raise ImgclfError(f"--initial cannot be negative, not {self.initial}")
        if self.patience < 1:
            raise ImgclfError(f"--patience must be at least 1, not {self.patience}")
        if not 0.0 < self.pool_valid_pct < 1.0 and self.valid_negatives is None:
            raise ImgclfError(f"--pool-valid-pct must be between 0 and 1 (exclusive), not "
                              f"{self.pool_valid_pct}; or pass --valid-negatives DIR")
        if not self.negative_label.strip():
            raise ImgclfError("--negative-label cannot be empty")


@dataclass
class MiningResult:
    """What `mine` did.

    Attributes:
        run: The run, whose bundle is now the best round's model.
        rounds: Per-round rows as in mining/rounds.json.
        best_round: The round whose model was kept.
        stop_reason: Why mining stopped, in words.
        baseline: The run's model before mining, on the same validation set.
    """

    run: Run
    rounds: list[dict]
    best_round: int
    stop_reason: str
    baseline: dict


# ---------------------------------------------------------------------------------------------
# Pure selection rules


def split_pool(paths: list[Path], valid_pct: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split pool images once into a mining part U and a held-out part V (seeded).

    The order of `paths` does not matter: they are sorted first, so the same files and seed give
    the same split. V gets round(valid_pct * N) images, at least one when N >= 2.
    """
    ordered = sorted(dict.fromkeys(Path(p) for p in paths), key=str)
    n_valid = int(round(valid_pct * len(ordered)))
    if len(ordered) >= 2:
        n_valid = min(max(n_valid, 1), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    valid = {int(i) for i in perm[:n_valid]}
    return ([p for i, p in enumerate(ordered) if i not in valid],
            [p for i, p in enumerate(ordered) if i in valid])


def false_positive_scores(probs: np.ndarray, negative_index: int | None = None,
                          thresholds: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image of none of the classes: predicted class, its confidence, false positive or not.

    Single-label: the predicted class is the argmax over the positive classes and its
    probability the confidence; the image is a false positive when the overall argmax is not
    the negative class. Multi-label (`negative_index` None): the confidence is the highest class
    probability, and the image is a false positive when any class reaches its threshold.

    Args:
        probs: [N, C] probabilities.
        negative_index: Column of the negative class (single-label); None for multi-label.
        thresholds: Multi-label decision thresholds [C] (default 0.5).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if negative_index is None:
        thr = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
        is_fp = (probs >= thr).any(axis=1)
        return probs.argmax(axis=1), probs.max(axis=1), is_fp
    positive = probs.copy()
    positive[:, negative_index] = -np.inf
    predicted = positive.argmax(axis=1)
    is_fp = probs.argmax(axis=1) != negative_index
    return predicted, positive.max(axis=1), is_fp


def top_false_positives(confidence: np.ndarray, is_fp: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most confident false positives, most confident first (ties: lower index)."""
    idx = np.flatnonzero(np.asarray(is_fp))
    order = np.lexsort((idx, -np.asarray(confidence)[idx]))
    return idx[order[:k]]


def better(a: dict, b: dict | None) -> bool:
    """Whether round metrics `a` beat `b`: overall accuracy, then fewer held-out false
    positives, then positive accuracy (ties keep the earlier round)."""
    if b is None:
        return True

    def key(m: dict) -> tuple[float, float, float]:
        return (round(m["overall_accuracy"], 9), -round(m["fp_rate_V"], 9),
                round(m["positive_accuracy"], 9))

    return key(a) > key(b)


# ---------------------------------------------------------------------------------------------
# Images


def _predict(model, pre, decoded: DecodedImages, multi_label: bool, batch_size: int) -> np.ndarray:
    """Probabilities in float32 on the center crop: exactly what validation and predict see."""
    from imgclf.deploy.predict import predict_images

    device = next(model.parameters()).device
    return predict_images(model, pre, decoded, multi_label, batch_size=batch_size, device=device)


def _list_images(folder: str | Path, flag: str) -> list[Path]:
    from imgclf.deploy.predict import expand_paths

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{display_path(folder)} is not a folder: pass {flag} a folder of images "
                        "that contain none of the classes")
    paths = [p.resolve() for p in expand_paths([folder.resolve()])]
    if not paths:
        raise DataError(f"{display_path(folder)} holds no images: pass {flag} a folder of images "
                        "that contain none of the classes")
    return paths


@dataclass
class _PoolScore:
    picks: list[dict]
    scored: int
    false_positives: int
    unreadable: dict[str, str]


def score_pool(model, pre, paths: list[Path], multi_label: bool, negative_index: int | None,
               thresholds: np.ndarray | None, classes: list[str], k: int,
               skip_digests: set[str], cache_dir: Path | None, batch_size: int = 64,
               console=None, description: str = "Scoring the pool") -> _PoolScore:
    """Score pool images chunk by chunk and return the k most confident false positives.

    Only three numbers per image are kept (predicted class, confidence, false positive or not),
    and images are decoded SCORE_CHUNK at a time, so memory does not grow with the pool.
    Images whose content equals one in `skip_digests` (a training or validation image, or an
    earlier copy in the pool) are not scored.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    seen = set(skip_digests)
    kept: list[Path] = []
    predicted, confidence, is_fp = [], [], []
    unreadable: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=len(paths))
        for start in range(0, len(paths), SCORE_CHUNK):
            chunk = paths[start:start + SCORE_CHUNK]
            decoded, errors, _ = decode_all(chunk, pre, cache_dir, progress=False)
            unreadable.update({str(p): why for p, why in errors.items()})
            fresh = []
            for i, d in enumerate(decoded.digests):
                if d not in seen:
                    seen.add(d)
                    fresh.append(i)
            if fresh:
                sub = decoded.subset(fresh)
                probs = _predict(model, pre, sub, multi_label, batch_size)
                p, c, f = false_positive_scores(probs, negative_index, thresholds)
                kept += sub.paths
                predicted.append(p)
                confidence.append(c)
                is_fp.append(f)
            bar.advance(task, len(chunk))
    if not kept:
        return _PoolScore([], 0, 0, unreadable)
    predicted_a, confidence_a, fp_a = (np.concatenate(predicted), np.concatenate(confidence),
                                       np.concatenate(is_fp))
    top = top_false_positives(confidence_a, fp_a, k)
    picks = [{"path": str(kept[i]), "predicted": classes[int(predicted_a[i])],
              "confidence": float(confidence_a[i])} for i in top]
    return _PoolScore(picks, len(kept), int(fp_a.sum()), unreadable)


# ---------------------------------------------------------------------------------------------
# Run-directory state


def _mining_dir(run_dir: Path) -> Path:
    return run_dir / MINING_DIR


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ImgclfError(f"{path} is damaged ({e}): remove {path.parent} to mine again from "
                          "the start") from e


def _save_manifest(mdir: Path, manifest: dict) -> None:
    atomic_write_json(mdir / "manifest.json", manifest)


def _snapshot_original(run_dir: Path) -> None:
    """Copy the run's files that mining rewrites, so every round starts from the same model
    and `--restart` can put them back."""
    if not (run_dir / "model" / "model.json").is_file():
        raise ImgclfError(f"{run_dir} has no trained model (model/model.json): finish training "
                          f"first, e.g. `imgclf train --resume {run_dir}`")
    dest = _mining_dir(run_dir) / "original"
    for name in _RUN_FILES:
        src = run_dir / name
        if src.is_file():
            atomic_write_bytes(dest / name, src.read_bytes())


def _restore_original(run_dir: Path) -> None:
    src = _mining_dir(run_dir) / "original"
    for name in _RUN_FILES:
        if (src / name).is_file():
            atomic_write_bytes(run_dir / name, (src / name).read_bytes())
        elif name == "thresholds.json":
            (run_dir / name).unlink(missing_ok=True)


def _save_weights(path: Path, model) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def _load_weights(path: Path, model) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ImgclfError(f"{path} is missing: the mining state is incomplete; rerun with "
                          "--restart to mine again from the start")
    model.load_state_dict(load_file(str(path)))


def _prune_weights(mdir: Path, keep: set[str]) -> None:
    for p in mdir.glob("round_*.safetensors"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def _resolve_options(manifest: dict | None, given: dict) -> MineOptions:
    """Options of this invocation: the manifest's fixed settings, checked against `given`."""
    if manifest is None:
        opts = MineOptions(**{k: v for k, v in given.items() if v is not None})
        opts.pool = str(Path(opts.pool).resolve())
        if opts.valid_negatives is not None:
            opts.valid_negatives = str(Path(opts.valid_negatives).resolve())
        if opts.initial is None:
            opts.initial = opts.per_round
        return opts
    saved = manifest["options"]
    for key in _FIXED:
        value = given.get(key)
        if value is None:
            continue
        if key in ("pool", "valid_negatives"):
            value = str(Path(value).resolve())
        if value != saved.get(key):
            raise ImgclfError(
                f"this run was mined with {key.replace('_', '-')}={saved.get(key)!r}, not "
                f"{value!r}: pass the same value to continue, or --restart to mine again from "
                "the start")
    merged = dict(saved)
    merged.update({k: v for k, v in given.items() if v is not None and k not in _FIXED})
    return MineOptions(**merged)


# ---------------------------------------------------------------------------------------------
# Rounds


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

    def negative_sample(self, path: str | Path, split: str) -> Sample:
        labels = () if self.task.multi_label else (self.opts.negative_label,)
        return Sample(Path(path), labels, split)


def _fit_data(s: _Setup, train_neg: DecodedImages) -> training.FitData:
    """Training: positives + mined negatives; validation: positives' validation split + V."""
    from torch.utils.data import ConcatDataset

    from imgclf.data.datasets import ImageDataset
    from imgclf.data.transforms import eval_transform, train_transform

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
    return training.FitData(train=train, valid=valid, y_train=y_tr, y_valid=y_va,
                            balance=_balance_mode(s, y_tr))


def _balance_mode(s: _Setup, y_train: torch.Tensor) -> str:
    """The run's imbalance setting, resolved on the training set as mining changed it."""
    from imgclf import balance

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


def _train_round(s: _Setup, model, train_neg: DecodedImages, lr: float, k: int, work: Path,
                 console) -> tuple[list[dict], bool]:
    """Fine-tune from the model's current weights; it ends holding the round's best epoch.

    Returns:
        The round's metrics.csv rows, and whether training was interrupted.
    """
    import lightning.pytorch as L

    frozen = s.opts.freeze_epochs > 0 and s.cfg.pretrained  # the recipe's frozen-stage rule
    if s.opts.epochs == 0 and not frozen:
        return [], False
    shutil.rmtree(work, ignore_errors=True)
    L.seed_everything(s.opts.seed + k, workers=True, verbose=False)
    # One process on one device: a round is small, and a multi-process launcher would start the
    # whole `mine` command again in every process.
    single = {k: v for k, v in {"devices": 1, "num_nodes": 1, "strategy": "auto"}.items()
              if hasattr(s.cfg, k)}
    extra = {k: v for k, v in (s.cfg.extra or {}).items()
             if k not in ("devices", "num_nodes", "strategy")}
    cfg = dataclasses.replace(s.cfg, epochs=s.opts.epochs, freeze_epochs=s.opts.freeze_epochs,
                              lr=lr, extra=extra, **single)
    # Checkpoints go to a scratch folder in mining/, never over the run's own resume state.
    result = training.fine_tune(model, s.task, s.pre, _fit_data(s, train_neg), cfg, work,
                                lambda row, improved: None, rows=[], best=training.Best(),
                                resume={}, console=console)
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


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def print_rounds(rounds: list[dict], baseline: dict | None, best_round: int | None,
                 console) -> None:
    """The per-round table: held-out false-positive rate, accuracies, what was mined."""
    from rich.table import Table

    table = Table(title="Hard negative mining")
    for col in ("round", "mined", "negatives in train", "pool FP", "FP rate V",
                "positive acc", "overall acc"):
        table.add_column(col, justify="right")
    if baseline:
        table.add_row("before", "-", "0", "-", _pct(baseline["fp_rate_V"]),
                      _pct(baseline["positive_accuracy"]), _pct(baseline.get("overall_accuracy")))
    for r in rounds:
        scored = r.get("pool_scored")
        fp = "-" if scored is None else f"{r['pool_false_positives']}/{scored}"
        mark = " *" if r["round"] == best_round else ""
        table.add_row(f"{r['round']}{mark}", str(r["n_mined"]), str(r["n_train_negatives"]), fp,
                      _pct(r["fp_rate_V"]), _pct(r["positive_accuracy"]),
                      _pct(r["overall_accuracy"]))
    console.print(table)
    if best_round is not None:
        console.print(f"* kept: round {best_round}")


def rounds_plot(rounds: list[dict], baseline: dict | None = None):
    """Held-out false-positive rate and accuracies per round."""
    from imgclf.report import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["round"] for r in rounds]
    for key, label in (("fp_rate_V", "false-positive rate on V"),
                       ("positive_accuracy", "accuracy on positives"),
                       ("overall_accuracy", "overall accuracy")):
        line = ax.plot(x, [r[key] for r in rounds], "o-", label=label)[0]
        if baseline and baseline.get(key) is not None:
            ax.axhline(baseline[key], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="round", ylabel="rate", ylim=(-0.03, 1.03),
           title="Hard negative mining (dotted: before mining)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The command


def mine(run: str | Path, pool: str | Path | None = None, *, per_round: int | None = None,
         rounds: int | None = None, epochs: int | None = None, initial: int | None = None,
         negative_label: str | None = None, valid_negatives: str | Path | None = None,
         pool_valid_pct: float | None = None, patience: int | None = None,
         lr: float | None = None, freeze_epochs: int | None = None,
         batch_size: int | None = None, seed: int | None = None, resume: bool = False,
         restart: bool = False, console=None) -> MiningResult:
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
        console: rich Console for progress and tables (default: stderr).

    Returns:
        The per-round table, the kept round and why mining stopped.
    """
    from imgclf import api

    console = api._console(console)
    api._set_threads()
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
    given = {"pool": None if pool is None else str(pool), "per_round": per_round,
             "rounds": rounds, "epochs": epochs, "initial": initial,
             "negative_label": negative_label,
             "valid_negatives": None if valid_negatives is None else str(valid_negatives),
             "pool_valid_pct": pool_valid_pct, "patience": patience, "lr": lr,
             "freeze_epochs": freeze_epochs, "batch_size": batch_size,
             "seed": seed if seed is not None or manifest is not None else cfg.seed}
    opts = _resolve_options(manifest, given)
    opts.check()
    if manifest is None:
        for folder, flag in ((opts.pool, "--pool"), (opts.valid_negatives, "--valid-negatives")):
            if folder is not None and not Path(folder).is_dir():
                raise DataError(f"{display_path(folder)} is not a folder: pass {flag} a folder "
                                "of images that contain none of the classes")
        _snapshot_original(run_dir)
        (mdir / "pool.json").unlink(missing_ok=True)  # from a start that never got a manifest
    s = _setup(run_dir, cfg, opts, console)
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
        manifest["rounds"].append({"round": 0, "status": "mined", "mined": seeds,
                                   "pool_scored": None, "pool_false_positives": None})
    _save_manifest(mdir, manifest)
    if s.added_class:
        models.grow_classifier(model)
    return _run_rounds(run_dir, s, model, manifest, _round_lr(run_dir, cfg, opts), console)


def _setup(run_dir: Path, cfg: TrainConfig, opts: MineOptions, console) -> _Setup:
    """The original model, the checked labelled images, the pool split and V."""
    from imgclf import api
    from imgclf.deploy.bundle import load as load_bundle

    mdir = _mining_dir(run_dir)
    original = load_bundle(mdir / "original" / "model")
    table = api.load_table(cfg)
    if list(table.classes) != list(original.classes):
        raise ImgclfError(
            f"{run_dir}: the data now has classes {table.classes}, but the model was trained on "
            f"{original.classes}: mine with the data the run was trained on")
    multi = original.multi_label
    added = not multi and opts.negative_label not in original.classes
    classes = list(original.classes) + ([opts.negative_label] if added else [])
    task = Task(tuple(classes), multi)
    prep = api.prepare_data(cfg, original.preprocess, console, table=table,
                            task=Task(tuple(original.classes), multi))
    cache_dir = api._cache_dir(cfg)

    split = _read_json(mdir / "pool.json")
    if split is None:
        in_table = {Path(x.path).resolve() for x in table.samples}
        pool_paths = [p for p in _list_images(opts.pool, "--pool") if p not in in_table]
        if opts.valid_negatives is not None:
            valid = [p for p in _list_images(opts.valid_negatives, "--valid-negatives")
                     if p not in in_table]
            held = set(valid)
            mining_part = [p for p in pool_paths if p not in held]
        else:
            mining_part, valid = split_pool(pool_paths, opts.pool_valid_pct, opts.seed)
        if not mining_part:
            raise DataError(f"{display_path(opts.pool)} leaves no images to mine after the "
                            "held-out part: add images to the pool or lower --pool-valid-pct")
        split = {"pool": opts.pool, "mining": [str(p) for p in mining_part],
                 "valid": [str(p) for p in valid]}
        atomic_write_json(mdir / "pool.json", split)

    positive_digests = set(prep.decoded.digests)
    valid_neg, errors, _ = decode_all([Path(p) for p in split["valid"]], original.preprocess,
                                      cache_dir, progress=False)
    for p, why in errors.items():
        console.print(f"[yellow]skipped[/] {display_path(p)}: {why}")
    # A held-out negative identical to a labelled image would be scored against two labels.
    usable = [i for i, d in enumerate(valid_neg.digests) if d not in positive_digests]
    if len(usable) < len(valid_neg):
        console.print(f"[yellow]{len(valid_neg) - len(usable)} held-out pool images are copies "
                      "of labelled images; they are left out[/]")
    valid_neg = valid_neg.subset(usable)
    if not len(valid_neg):
        raise DataError("no usable held-out negatives (V): pass --valid-negatives DIR or a "
                        "larger pool")
    return _Setup(cfg=cfg, opts=opts, pre=original.preprocess, task=task,
                  negative_index=None if multi else classes.index(opts.negative_label),
                  added_class=added, prep=prep, valid_neg=valid_neg,
                  known_digests=positive_digests | set(valid_neg.digests), cache_dir=cache_dir,
                  mining_paths=[Path(p) for p in split["mining"]], original=original)


def _has_negatives(s: _Setup) -> bool:
    """Whether training already holds negatives (then round 0 adds none and only evaluates)."""
    train = s.prep.table.split(TRAIN)
    if s.task.multi_label:
        return any(not x.labels for x in train)
    return not s.added_class and any(x.labels == (s.opts.negative_label,) for x in train)


def _mine_round(s: _Setup, model, manifest: dict, k: int, thresholds, console) -> dict | str:
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
                       console, description=f"Round {k}: scoring {len(remaining)} pool images")
    manifest.setdefault("unreadable", {}).update(score.unreadable)
    if not score.picks:
        return "no false positives left in the mining pool"
    return {"round": k, "status": "mined", "mined": score.picks, "pool_scored": score.scored,
            "pool_false_positives": score.false_positives}


def _run_rounds(run_dir: Path, s: _Setup, model, manifest: dict, lr: float,
                console) -> MiningResult:
    mdir = _mining_dir(run_dir)
    opts = s.opts
    done = [r for r in manifest["rounds"] if r["status"] == "done"]
    reason = manifest.get("stop_reason")
    more_rounds = bool(reason) and reason.startswith("reached") and len(done) - 1 < opts.rounds
    if reason and not more_rounds:
        if manifest.get("finished"):
            console.print(f"Mining of {run_dir} already finished: {reason} "
                          "(--restart mines again from the start)")
        else:  # stopped, but interrupted while writing the results
            _finish(run_dir, s, model, manifest, console)
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
            entry = _mine_round(s, model, manifest, k, thresholds, console)
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
            console.print(f"[yellow]skipped[/] {display_path(p)}: {why}")
        console.print(f"[bold]Round {k}[/]: {len(pending['mined'])} new negatives, "
                      f"{len(train_neg)} in training")
        epochs: list[dict] = []
        if pending["mined"]:
            epochs, interrupted = _train_round(s, model, train_neg, lr, k, mdir / "work", console)
            if interrupted:
                console.print(f"Interrupted in round {k}: rerun the same command to continue")
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
        console.print(f"Round {k}: false-positive rate on held-out negatives "
                      f"{metrics['fp_rate_V']:.3f}, positive accuracy "
                      f"{metrics['positive_accuracy']:.3f}, overall "
                      f"{metrics['overall_accuracy']:.3f}{'  (best so far)' if improved else ''}")
        since_best = k - manifest["best_round"]
        if since_best >= opts.patience:
            manifest["stop_reason"] = (f"no better validation score for {since_best} "
                                       f"round{'s' if since_best > 1 else ''} (--patience "
                                       f"{opts.patience})")
            break
        k += 1

    _save_manifest(mdir, manifest)
    _finish(run_dir, s, model, manifest, console)
    return _result(run_dir, manifest)


def _result(run_dir: Path, manifest: dict) -> MiningResult:
    return MiningResult(run=Run(run_dir), rounds=_rounds_table(manifest),
                        best_round=manifest["best_round"], stop_reason=manifest["stop_reason"],
                        baseline=manifest.get("baseline", {}))


def _finish(run_dir: Path, s: _Setup, model, manifest: dict, console) -> None:
    """The best round's model becomes the run's bundle; metrics, predictions, plots, report."""
    from imgclf import api
    from imgclf.deploy.bundle import save_bundle
    from imgclf.report import plots

    mdir = _mining_dir(run_dir)
    best = manifest["rounds"][manifest["best_round"]]
    _load_weights(mdir / best["weights"], model)
    model.eval()
    _, preds, search = _evaluate(s, model)
    thresholds = None if search is None else search.thresholds
    scores = evaluation.metrics(preds)
    preds.to_csv(run_dir / "predictions.csv")
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
        atomic_write_json(run_dir / "thresholds.json", search.to_dict())
    atomic_write_json(run_dir / "metrics.json", summary)
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
    save_bundle(run_dir / "model", model, s.cfg.model, list(s.task.classes), s.task.multi_label,
                s.pre, thresholds=None if thresholds is None else [float(t) for t in thresholds],
                tta=s.original.tta,
                extra={"trained_on": original_meta.get("trained_on", str(s.cfg.data)),
                       "negatives": {"pool": s.opts.pool, "best_round": best["round"],
                                     "label": None if s.task.multi_label
                                     else s.opts.negative_label},
                       "valid_metrics": {k: v for k, v in summary.items()
                                         if k.startswith("valid_") and not isinstance(v, dict)}})
    pdir = run_dir / "plots"
    plots.save(plots.curves(rows, s.task.monitor), pdir / "curves.png")
    plots.save(rounds_plot(rounds, manifest.get("baseline")), pdir / "mining.png")
    if not s.task.multi_label:
        cm = evaluation.confusion(preds)
        plots.save(plots.confusion(cm, list(s.task.classes)), pdir / "confusion.png")
        plots.save(plots.confusion(cm, list(s.task.classes), normalized=True),
                   pdir / "confusion_normalized.png")
    print_rounds(rounds, manifest.get("baseline"), best["round"], console)
    console.print(f"Stopped: {manifest['stop_reason']}. Kept round {best['round']} as "
                  f"{run_dir / 'model'} (classes: {', '.join(s.task.classes)})")
    manifest["finished"] = True
    _save_manifest(mdir, manifest)
    api.write_report(run_dir, console)
