"""`imgclf evaluate`: score a bundle on its run's validation set or on other labelled images
(the body of `imgclf.api.evaluate`).

The per-class table is logged as a record whose `view` is "evaluation" (the command line draws
it); the headline numbers and the most confused pairs are plain log lines.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np

from imgclf import evaluation
from imgclf.commands import train as train_cmd
from imgclf.commands.run import Run
from imgclf.config import TrainConfig
from imgclf.data.cache import decode_all, default_cache_dir
from imgclf.data.samples import VALID, Sample
from imgclf.data.sources import load_table
from imgclf.deploy.bundle import Bundle
from imgclf.deploy.bundle import load as load_bundle
from imgclf.deploy.predict import predict_images
from imgclf.errors import DataError, ImgclfError
from imgclf.io import atomic_write_json, atomic_write_text
from imgclf.training.task import Task

log = logging.getLogger(__name__)

@train_cmd.uses_all_cores
def evaluate(target: str | Path, data: str | Path | None = None, *, out: str | Path | None = None,
             tta: int | None = None, tta_reduce: str | None = None, batch_size: int = 32,
             **source_options) -> dict:
    """`imgclf.api.evaluate` (documented there): score a bundle, write metrics and plots."""
    from imgclf.report import plots  # lazy: matplotlib (and its Agg backend) only once plots are drawn

    bundle = load_bundle(target)
    tta, tta_reduce = bundle.tta_setting(tta, tta_reduce)
    run_dir = bundle.path.parent if (bundle.path.parent / "config.yaml").is_file() else None
    if data is None:
        if run_dir is None:
            raise ImgclfError(f"{target} is a bare bundle: pass labelled DATA to evaluate on")
        cfg = Run(run_dir).config()
        table = load_table(cfg)
        samples = measured_samples(run_dir, bundle.multi_label) or table.split(VALID)
        out_dir = Path(out) if out else run_dir
        cache = train_cmd._cache_dir(cfg)
    else:
        if bundle.multi_label and source_options.get("csv") and \
                source_options.get("multi_label") is None:
            # a labels file where no image has two labels would otherwise read as single-label
            source_options["multi_label"] = True
        cfg = dataclasses.replace(TrainConfig(), data=str(data), **source_options)
        table = load_table(cfg)
        if table.multi_label and not bundle.multi_label:
            raise ImgclfError(f"{data}: its labels are multi-label (images with several or no "
                              "labels) and the model is single-label: evaluate a multi-label "
                              "model, or pass --single-label if each image has one label")
        samples = table.samples
        base = run_dir or bundle.path
        out_dir = Path(out) if out else base / "eval" / (Path(data).resolve().name or "data")
        cache = default_cache_dir()
    known = set(bundle.classes)
    unknown = sorted({lab for s in samples for lab in s.labels} - known)
    if unknown:
        log.warning("Skipping images with labels the model does not know: %s%s",
                    ", ".join(unknown[:10]), " ..." if len(unknown) > 10 else "")
        samples = [s for s in samples if set(s.labels) <= known]
    if not samples:
        raise DataError("no images with known labels to evaluate on")
    table = table.with_samples(samples)
    decoded, errors, _ = decode_all([s.path for s in samples], bundle.preprocess, cache)
    for p, reason in errors.items():
        log.warning("skipped %s: %s", p, reason)
    by_path = {s.path: s for s in samples}
    used = [by_path[p] for p in decoded.paths]
    task = Task(tuple(bundle.classes), bundle.multi_label)
    targets = task.targets_numpy(task.encode(used))
    thresholds = bundle.decision_thresholds() if bundle.multi_label else None

    def score(n_tta: int) -> tuple[evaluation.Predictions, dict]:
        probs = predict_images(bundle.model, bundle.preprocess, decoded, bundle.multi_label,
                               batch_size=batch_size, tta=n_tta, reduce=tta_reduce)
        p = evaluation.Predictions(paths=[str(s.path) for s in used], classes=bundle.classes,
                                   probs=probs, targets=targets, multi_label=bundle.multi_label,
                                   thresholds=thresholds)
        return p, evaluation.metrics(p)

    preds, scores = score(0)
    result = {k: v for k, v in scores.items()}
    if tta:
        preds_tta, scores_tta = score(tta)
        result["tta"] = {"views": tta + 1, "reduce": tta_reduce,
                         **{k: v for k, v in scores_tta.items() if not isinstance(v, dict)}}
        preds, scores = preds_tta, scores_tta
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir != run_dir:
        preds.to_csv(out_dir / "predictions.csv")
    atomic_write_json(out_dir / ("metrics.json" if out_dir != run_dir else "evaluation.json"),
                      result)
    if not bundle.multi_label:
        cm = evaluation.confusion(preds)
        _write_confusion_csv(out_dir / "confusion.csv", cm, bundle.classes)
        plots.save(plots.confusion(cm, bundle.classes), out_dir / "plots" / "confusion.png")
        result["most_confused"] = evaluation.most_confused(preds, min_count=1)[:20]
    _log_evaluation(result, bundle)
    if run_dir is not None and out_dir == run_dir:
        train_cmd.write_report(run_dir)
    log.info("Results: %s", out_dir)
    return result


def measured_samples(run_dir: Path, multi_label: bool) -> list[Sample] | None:
    """The images and labels the run's own numbers were measured on, from its predictions.csv.

    The data's validation split is not always that set: after `imgclf mine` it gains the
    held-out negatives, and corrections relabel or exclude images. Reading the file keeps
    `evaluate RUN` scoring exactly what metrics.json scored. None when there is no file.
    """
    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        return [Sample(Path(r["path"]), tuple((r["target"] or "").split()) if multi_label
                       else (r["target"],), VALID) for r in rows]
    except (OSError, KeyError, csv.Error) as e:
        raise ImgclfError(f"{path} is damaged ({e}): delete it to evaluate on the data's "
                          "validation split instead") from None


def _write_confusion_csv(path: Path, cm: np.ndarray, classes: list[str]) -> None:
    lines = ["actual\\predicted," + ",".join(classes)]
    lines += [f"{c}," + ",".join(str(int(v)) for v in row) for c, row in zip(classes, cm)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _log_evaluation(result: dict, bundle: Bundle) -> None:
    """The headline numbers (and with TTA), the per-class table, the most confused pairs."""
    head = (["zero_one_accuracy", "hamming_accuracy", "f1_macro", "map"] if bundle.multi_label
            else ["accuracy", "balanced_accuracy", "f1_macro", "loss"])
    line = "  ".join(f"{k}={result[k]:.4f}" for k in head if result.get(k) is not None)
    log.info("%s images  %s", result.get("n_samples", ""), line)
    if "tta" in result:
        t = result["tta"]
        line = "  ".join(f"{k}={t[k]:.4f}" for k in head if t.get(k) is not None)
        log.info("with TTA (%s views)  %s", t["views"], line)
    title = "Per class"
    if bundle.multi_label:
        title += (" at the bundle's thresholds (tuned on validation)" if bundle.thresholds
                  else " at threshold 0.5 (the bundle has no tuned thresholds)")
    if len(result.get("per_class") or {}) <= 60:
        log.info("%s", title, extra={"view": "evaluation", "data": {
            "metrics": result, "multi_label": bundle.multi_label}})
    for a, p, n in result.get("most_confused", [])[:10]:
        log.info("  %s -> %s: %s", a, p, n)
