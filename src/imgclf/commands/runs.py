"""`imgclf runs` and `imgclf compare`: the runs under a folder as rows of data, and one HTML page
comparing some of them (drawn by `imgclf.report.compare`).

A row holds what tells runs apart at a glance: the data, the model, a one-line summary of the
recipe (epochs, size, learning rate, batch and whatever differs from the defaults), the headline
validation score, the training time and when the run finished. The command line draws the rows
as a table (`imgclf.cli.render.runs`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.rundir import RunDir

# Folders of a run directory that hold no run of their own.
_INSIDE_RUN = {"model", "checkpoints", "mining", "plots", "logs", "eval"}
# Recipe settings named in the summary when they differ from the defaults.
_TECHNIQUES = ("mixup", "cutmix", "label_smoothing", "tta", "ema", "lr_mult", "batchnorm",
               "balance", "resize", "sizes", "stage_schedule", "norm_stats", "precision")
_DEFAULTS = TrainConfig()


def find_runs(folder: str | Path) -> list[Path]:
    """Run directories (a config.yaml) under `folder`, itself included, cross-validation folds
    too; sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImgclfError(f"{folder} is not a folder: pass the folder holding the run "
                          "directories (imgclf train --out, default runs/)")
    found = []
    for cfg in folder.rglob("config.yaml"):
        rel = cfg.parent.relative_to(folder).parts
        if not _INSIDE_RUN.intersection(rel):
            found.append(cfg.parent)
    return sorted(found)


def headline(metrics: dict) -> tuple[str, float | None]:
    """The score runs are ranked by: accuracy, or exact-match accuracy for multi-label runs."""
    for key, name in (("valid_accuracy", "accuracy"), ("valid_zero_one_accuracy", "exact match")):
        if isinstance(metrics.get(key), (int, float)):
            return name, float(metrics[key])
    return "accuracy", None


def recipe(cfg: TrainConfig, metrics: dict, size: int | None) -> str:
    """One line: epochs (frozen + whole network), input size, learning rate, batch size, then
    the settings that differ from the defaults, e.g. "1+5 ep, 224 px, lr 1.2e-03 (auto),
    bs 32, mixup 0.2"."""
    frozen = cfg.freeze_epochs if cfg.pretrained else 0
    epochs = (metrics.get("epochs") if cfg.epochs is None else cfg.epochs) or 0
    parts = [f"{frozen}+{epochs} ep" if frozen else f"{epochs} ep"]
    if size:
        parts.append(f"{size} px")
    lr = metrics.get("lr")
    if isinstance(lr, (int, float)):
        parts.append(f"lr {lr:.1e}" + (" (auto)" if cfg.lr == "auto" else ""))
    else:
        parts.append(f"lr {cfg.lr}")
    parts.append(f"bs {cfg.batch_size}")
    if not cfg.pretrained:
        parts.append("from scratch")
    for name in _TECHNIQUES:
        value = getattr(cfg, name)
        if value != getattr(_DEFAULTS, name) and value not in (None, ""):
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"{name.replace('_', ' ')} {shown}")
    if metrics.get("mining"):
        parts.append(f"mined (round {metrics['mining'].get('best_round')})")
    return ", ".join(parts)


def run_row(run_dir: str | Path, root: str | Path | None = None) -> dict:
    """What `imgclf runs` shows of one run directory.

    Returns:
        run (path relative to `root`), path, data, model, recipe, metric (the headline's
        name), score, seconds (training time), finished (ISO date, None when unfinished),
        status ("finished", "interrupted" or "unfinished"), epochs and best_epoch.
    """
    run = RunDir(run_dir)
    try:
        cfg = run.config()
    except ImgclfError:
        cfg = None
    metrics = run.metrics()
    meta_p = run.bundle_path / "model.json"
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8")) if meta_p.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    size = (meta.get("preprocess") or {}).get("size") or (cfg.size if cfg else None)
    name, score = headline(metrics)
    metrics_p = run.path / "metrics.json"
    finished = (dt.datetime.fromtimestamp(metrics_p.stat().st_mtime).isoformat(sep=" ", timespec="minutes")
                if metrics_p.is_file() else None)
    status = ("unfinished" if not metrics else "interrupted" if metrics.get("interrupted")
              else "finished")
    shown = run.path.relative_to(root) if root is not None else run.path
    return {
        "run": str(shown) if str(shown) != "." else run.path.name,
        "path": str(run.path),
        "data": _short(cfg.data) if cfg else "?",
        "model": metrics.get("model") or (cfg.model if cfg else "?"),
        "recipe": recipe(cfg, metrics, size) if cfg else "(config.yaml unreadable)",
        "metric": name,
        "score": score,
        "seconds": metrics.get("train_seconds"),
        "finished": finished,
        "status": status,
        "epochs": metrics.get("epochs"),
        "best_epoch": metrics.get("best_epoch"),
    }


def _labels(paths: list[Path]) -> list[str]:
    """Short unique names: the folder's name, with its parent's where two share one."""
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i + 1}: {n}" for i, n in enumerate(names)]
    return names


def _short(path: str, keep: int = 2) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-keep:])) if len(parts) > keep else str(path)


def list_runs(folder: str | Path = "runs", *, sort: str = "finished") -> list[dict]:
    """The rows of every run under `folder` (see `run_row`), sorted by `sort`: "finished"
    (oldest first, unfinished last), "score" (best first) or "run" (by path)."""
    rows = [run_row(p, folder) for p in find_runs(folder)]
    if sort == "score":
        rows.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0)))
    elif sort == "finished":
        rows.sort(key=lambda r: (r["finished"] is None, r["finished"] or "", r["run"]))
    elif sort != "run":
        raise ImgclfError(f"--sort {sort!r} is not one of finished | score | run")
    return rows


def compare(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write one self-contained HTML page comparing `runs`: their summary rows, their
    validation curves overlaid and the settings in which they differ.

    Args:
        runs: Two or more run directories.
        out: The page (default: compare.html in the current folder).

    Returns:
        The page's path.
    """
    from imgclf.report.compare import write_comparison  # lazy: matplotlib and Jinja

    if len(runs) < 2:
        raise ImgclfError("imgclf compare needs at least two run directories")
    dirs = [RunDir(p) for p in runs]
    rows = [run_row(d.path) for d in dirs]
    for row, label in zip(rows, _labels([d.path for d in dirs])):
        row["label"] = label
    configs = []
    for d in dirs:
        try:
            configs.append(dataclasses.asdict(d.config()))
        except ImgclfError:
            configs.append({})
    return write_comparison(dirs, rows, configs, Path(out or "compare.html"))
