"""k-fold cross-validation: stratified, group-aware folds, each trained as a normal run.

    <cv_dir>/cv_config.yaml        the shared settings (each fold's config.yaml adds its `fold`)
    <cv_dir>/fold-<k>/             a complete run directory validating on fold k
    <cv_dir>/cv_summary.json       per-fold metrics, their mean and standard deviation, and the
                                   metrics of the pooled out-of-fold predictions
    <cv_dir>/oof_predictions.csv   every image exactly once: path, fold, target, predicted,
                                   prob_<class>..., loss (from the model that never saw it)

A fold run's config.yaml carries `folds`, `fold` and `seed`, so it reproduces (or resumes) on its
own: `imgclf.data.sources.load_table` deals the folds again (`imgclf.data.split.fold_table`) and
validates on fold k.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf import evaluation
from imgclf.commands import train as train_cmd
from imgclf.config import TrainConfig, with_options
from imgclf.data import corrections
from imgclf.data.samples import TRAIN, VALID
from imgclf.data.sources import load_table
from imgclf.data.split import assign_folds
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_json, atomic_write_text
from imgclf.rundir import new_run_dir

log = logging.getLogger(__name__)

CV_CONFIG = "cv_config.yaml"
SUMMARY = "cv_summary.json"
OOF = "oof_predictions.csv"
HEADLINE = {
    False: ("accuracy", "balanced_accuracy", "f1_macro", "loss"),
    True: ("zero_one_accuracy", "hamming_accuracy", "f1_macro", "map"),
}


@dataclass
class CvResult:
    """A finished cross-validation.

    Attributes:
        path: The cross-validation folder.
        summary: The contents of cv_summary.json.
        oof: Out-of-fold predictions of every image.
        folds: The fold of each row of `oof`.
    """

    path: Path
    summary: dict
    oof: evaluation.Predictions
    folds: list[int]


def cross_validate(data: str | Path | None = None, *, folds: int = 5,
                   config: TrainConfig | None = None, resume: str | Path | None = None,
                   **options) -> CvResult:
    """`imgclf.api.cross_validate` (documented there): one run per fold, pooled."""
    if resume is not None:
        cv_dir = Path(resume)
        if not (cv_dir / CV_CONFIG).is_file():
            raise ImgclfError(f"{cv_dir} is not a cross-validation folder (no {CV_CONFIG}): pass "
                              "the folder printed when `imgclf cv` started")
        cfg = TrainConfig.from_yaml(cv_dir / CV_CONFIG, run=True)
    else:
        cfg = with_options(config, **options)
        if data is not None:
            cfg.data = str(data)
        if not cfg.data:
            raise ImgclfError("no data given: pass a folder of images, e.g. `imgclf cv photos/`")
        if folds < 2:
            raise ImgclfError(f"--folds {folds}: cross-validation needs at least 2 folds")
        cfg.folds, cfg.fold = folds, None
        # Fail on bad settings and impossible folds before creating anything.
        cfg.check()
        corrections.pin(cfg)  # every fold applies the same file, recorded with its digest
        table = load_table(dataclasses.replace(cfg, folds=0))
        pool = [s for s in table.samples if s.split in (TRAIN, VALID)]
        assign_folds(pool, cfg.folds, cfg.seed, table.multi_label)
        cv_dir = new_run_dir(cfg.out, cfg.name, cfg.data)
        cfg.name = cv_dir.name
        cfg.to_yaml(cv_dir / CV_CONFIG)
    log.info("Cross-validation folder: %s (%d folds)", cv_dir, cfg.folds)
    for k in range(cfg.folds):
        fold_dir = cv_dir / f"fold-{k}"
        log.info("%s", f"fold {k} ({k + 1} of {cfg.folds})", extra={"view": "rule", "data": None})
        if (fold_dir / "model" / "model.json").is_file() and (fold_dir / "metrics.json").is_file():
            log.info("%s already finished", fold_dir)
        elif (fold_dir / "config.yaml").is_file():
            train_cmd.train(resume=fold_dir)
        else:
            train_cmd.train(config=dataclasses.replace(cfg, fold=k, out=str(cv_dir), name=f"fold-{k}"))
    result = summarize(cv_dir, cfg.folds)
    _log_summary(result)
    return result


def summarize(cv_dir: str | Path, folds: int) -> CvResult:
    """Read the fold runs of a cross-validation folder; write cv_summary.json and the OOF file.

    Standard deviations are the sample standard deviation over folds (n - 1 in the
    denominator); undefined metrics (None in a fold) are left out of the mean.
    """
    cv_dir = Path(cv_dir)
    per_fold, parts, fold_of = [], [], []
    for k in range(folds):
        fold_dir = cv_dir / f"fold-{k}"
        metrics_p = fold_dir / "metrics.json"
        if not metrics_p.is_file():
            raise ImgclfError(f"{fold_dir} has no metrics.json: the fold did not finish; "
                              f"resume with `imgclf cv --resume {cv_dir}`")
        m = json.loads(metrics_p.read_text())
        multi = m.get("task") == "multi_label"
        thresholds = list(m["thresholds"].values()) if m.get("thresholds") else None
        preds = evaluation.Predictions.from_csv(fold_dir / "predictions.csv", multi_label=multi,
                                                thresholds=thresholds)
        parts.append(preds)
        fold_of += [k] * len(preds.paths)
        row = {"fold": k, "run": fold_dir.name, "train_images": m.get("train_images"),
               "valid_images": m.get("valid_images"), "best_epoch": m.get("best_epoch"),
               "train_seconds": m.get("train_seconds")}
        row.update({k2[len("valid_"):]: v for k2, v in m.items()
                    if k2.startswith("valid_") and k2 != "valid_images"
                    and (v is None or isinstance(v, (int, float))) and not isinstance(v, bool)})
        per_fold.append(row)
    multi = parts[0].multi_label
    classes = parts[0].classes
    if any(p.classes != classes for p in parts):
        raise ImgclfError(f"{cv_dir}: the folds were trained on different classes; "
                          "start the cross-validation again")
    seen = Counter(path for p in parts for path in p.paths)
    twice = [p for p, n in seen.items() if n > 1]
    if twice:
        raise ImgclfError(f"{cv_dir}: {twice[0]} was validated in more than one fold; "
                          "the folds do not match — start the cross-validation again")
    oof = evaluation.Predictions(
        paths=[x for p in parts for x in p.paths], classes=classes,
        probs=np.concatenate([p.probs for p in parts]),
        targets=np.concatenate([p.targets for p in parts]), multi_label=multi)
    predicted = [cell for p in parts for cell in _predicted_cells(p)]
    _write_oof(cv_dir / OOF, oof, fold_of, predicted)
    metric_names = [k for k in per_fold[0] if k not in ("fold", "run", "train_images",
                                                        "valid_images", "best_epoch",
                                                        "train_seconds", "n_samples")]
    mean, std = {}, {}
    for name in metric_names:
        values = [r.get(name) for r in per_fold]
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        mean[name] = float(np.mean(values)) if values else None
        std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    summary = {
        "data": _config_field(cv_dir, "data"),
        "folds": folds,
        "task": "multi_label" if multi else "single_label",
        "classes": classes,
        "images": len(oof.paths),
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "std_ddof": 1,
    }
    if not multi:
        # Multi-label folds tune their own thresholds, so pooled decisions would mix rules.
        pooled = evaluation.metrics(oof)
        summary["out_of_fold"] = {k: v for k, v in pooled.items()
                                  if not isinstance(v, (dict, list))}
    atomic_write_json(cv_dir / SUMMARY, summary)
    return CvResult(cv_dir, summary, oof, fold_of)


def _config_field(cv_dir: Path, name: str):
    p = cv_dir / CV_CONFIG
    return getattr(TrainConfig.from_yaml(p), name) if p.is_file() else None


def _predicted_cells(p: evaluation.Predictions) -> list[str]:
    """Each row's predicted label(s) under its own fold's decision rule."""
    return [row["predicted"] for row in p.to_rows()]


def _write_oof(path: Path, oof: evaluation.Predictions, folds: list[int],
               predicted: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    targets = [r["target"] for r in oof.to_rows()]
    w.writerow(["path", "fold", "target", "predicted", *[f"prob_{c}" for c in oof.classes], "loss"])
    for i, image in enumerate(oof.paths):
        w.writerow([image, folds[i], targets[i], predicted[i],
                    *(f"{v:.7g}" for v in oof.probs[i]), f"{oof.losses[i]:.6g}"])
    atomic_write_text(path, buf.getvalue())


def read_oof(path: str | Path) -> tuple[evaluation.Predictions, list[int]]:
    """oof_predictions.csv back: the predictions and the fold of each row."""
    path = Path(path)
    preds = evaluation.Predictions.from_csv(path)
    with open(path, newline="", encoding="utf-8") as f:
        folds = [int(r["fold"]) for r in csv.DictReader(f)]
    return preds, folds


def _log_summary(result: CvResult) -> None:
    """The per-fold table (view "cv_summary": per-fold metrics, mean ± std, out-of-fold), then
    where the files are."""
    s = result.summary
    columns = [n for n in HEADLINE[s["task"] == "multi_label"] if n in s["mean"]]
    log.info("Cross-validation: %d folds, %d images", s["folds"], s["images"],
             extra={"view": "cv_summary", "data": {"summary": s, "columns": columns}})
    log.info("Summary: %s", result.path / SUMMARY)
    log.info("Out-of-fold predictions: %s", result.path / OOF)
    if s["task"] != "multi_label":
        log.info("Suspected label errors: `imgclf label-issues %s`", result.path)
