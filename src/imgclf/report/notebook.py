"""For notebooks: what the model will see (`show_batch`), what it made of the validation images
(`show_results`), and the compact HTML that Jupyter shows for a `Run` (`run_html`).

Every figure is a `matplotlib.figure.Figure` made without pyplot (see `imgclf.report.plots`):
Jupyter displays it as the cell's value, and the caller's backend and pyplot's figure list are
left as they were.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from imgclf.config import TrainConfig, with_options
from imgclf.data.cache import decode_all, default_cache_dir
from imgclf.data.samples import TRAIN, VALID
from imgclf.data.sources import load_table
from imgclf.data.transforms import Preprocess, train_transform
from imgclf.errors import DataError, ImgclfError
from imgclf.report import plots
from imgclf.report.interpret import Interpretation, _wrap, thumbnail
from imgclf.rundir import RunDir


def _model_preprocess(cfg: TrainConfig) -> Preprocess:
    """The preprocessing training would use for `cfg.model` (size, presize, interpolation),
    from timm's pretrained config, without building the model."""
    import timm  # lazy: only show_batch needs the model's configuration

    pretrained = timm.models.get_pretrained_cfg(cfg.model)
    if pretrained is None and not timm.is_model(cfg.model.split(".")[0]):
        raise ImgclfError(f"--model {cfg.model!r} is not a timm architecture")
    model_cfg = pretrained.to_dict() if pretrained is not None else {}
    size = cfg.size or (cfg.sizes[-1] if cfg.sizes else None)
    return Preprocess.from_model_cfg(model_cfg, size=size, resize=cfg.resize)


def show_batch(data: str | Path | None = None, n: int = 12, *, split: str = TRAIN,
               seed: int = 0, cols: int = 4, config: TrainConfig | None = None, **options):
    """A figure of what the model will see: images as training decodes, presizes and
    augments them (random resized crop and flip; mixup and cutmix mix whole batches and are
    not drawn), titled with their labels.

    Args:
        data: Image folder (or the root of a CSV's file names), as for `imgclf.train`.
        n: Images shown (a seeded random choice of the split).
        split: "train" (augmented) or "valid" (the centre crop validation and predict take).
        seed: Seed of the choice and of the augmentation; the caller's random state is kept.
        cols: Images per row.
        config: Settings (`TrainConfig`); `options` override its fields (model=, size=,
            csv=, label_pattern=, resize=, ...).

    Returns:
        A matplotlib Figure.
    """
    cfg = with_options(config, **options)
    if data is not None:
        cfg.data = str(data)
    cfg.check()
    if split not in (TRAIN, VALID):
        raise ImgclfError(f"split={split!r}: show 'train' (augmented) or 'valid' images")
    table = load_table(cfg)
    samples = table.split(split)
    if not samples:
        raise DataError(f"no {split} images in {cfg.data}")
    rng = np.random.default_rng(seed)
    picked = [samples[int(i)] for i in rng.permutation(len(samples))[:n]]
    pre = _model_preprocess(cfg)
    cache = None if cfg.cache_dir == "" else Path(cfg.cache_dir or default_cache_dir())
    decoded, errors, _ = decode_all([s.path for s in picked], pre, cache, progress=False)
    index = {p: i for i, p in enumerate(decoded.paths)}
    crop = train_transform(pre.size) if split == TRAIN else None
    images, titles = [], []
    with torch.random.fork_rng(devices=[]):  # the augmentation's draws, not the caller's
        torch.manual_seed(seed)
        for s in picked:
            if s.path not in index:
                images.append(None)
                titles.append(_wrap(f"unreadable: {errors.get(s.path, '')}"))
                continue
            x = torch.from_numpy(np.ascontiguousarray(decoded.get(index[s.path])))
            if crop is not None:
                x = crop(x)
            else:
                top = (x.shape[-1] - pre.size) // 2
                x = x[:, top:top + pre.size, top:top + pre.size]
            images.append(x.permute(1, 2, 0).numpy())
            titles.append(_wrap(", ".join(s.labels) or "(no label)"))
    return plots.image_grid(images, titles, cols=cols)


def show_results(run_dir: str | Path, n: int = 12, *, seed: int = 0, wrong_first: bool = False,
                 cols: int = 4):
    """A figure of validation images with their given and predicted labels (from
    predictions.csv; red titles where the prediction is wrong).

    Args:
        run_dir: The run directory.
        n: Images shown: a seeded random choice, or the wrong ones first with `wrong_first`.
        seed: Seed of the choice.
        wrong_first: Show the mistakes (highest loss first) before the rest.
        cols: Images per row.
    """
    interp = Interpretation.from_run(run_dir)
    total = len(interp.predictions.paths)
    order = list(np.random.default_rng(seed).permutation(total))
    if wrong_first:
        examples = [interp.example(int(i)) for i in order]
        wrong = sorted((e for e in examples if not e.correct), key=lambda e: -e.loss)
        chosen = (wrong + [e for e in examples if e.correct])[:n]
    else:
        chosen = [interp.example(int(i)) for i in sorted(order[:n])]
    images = [None if (t := thumbnail(e.path, 256)) is None else np.asarray(t) for e in chosen]
    titles = []
    for e in chosen:
        given = ", ".join(e.actual) or "(none)"
        predicted = ", ".join(e.predicted) or "(none)"
        p = f" {e.prob(e.predicted[0]):.2f}" if e.predicted and not e.multi_label else ""
        titles.append(f"given: {_wrap(given, 28)}\npredicted: {_wrap(predicted, 24)}{p}")
    return plots.image_grid(images, titles, [e.correct for e in chosen], cols=cols, size=2.7)


def run_html(run: RunDir) -> str:
    """A Run as a small HTML table for Jupyter: name, data, model, headline score, epochs,
    training time, and a link to its report."""
    m = run.metrics()
    try:
        cfg = run.config()
    except ImgclfError:
        cfg = None
    rows = [("data", cfg.data if cfg else "?"), ("model", m.get("model") or
                                                 (cfg.model if cfg else "?"))]
    for key, label in (("valid_accuracy", "accuracy"), ("valid_zero_one_accuracy", "exact match"),
                       ("valid_f1_macro", "macro F1"), ("valid_loss", "valid loss")):
        if isinstance(m.get(key), (int, float)):
            rows.append((label, f"{m[key]:.4f}"))
    if m.get("epochs") is not None:
        rows.append(("epochs", f"{m['epochs']} (kept: {m.get('best_epoch')}, "
                               f"{m.get('best_stage', '')})"))
    if m.get("train_seconds") is not None:
        rows.append(("training", f"{m['train_seconds']:.1f} s"))
    if not m:
        rows.append(("status", "unfinished (no metrics.json)"))
    cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                    f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    report = ""
    if run.report_path.is_file():
        # Relative paths open from a notebook's own folder; absolute ones as file: links.
        href = html.escape(run.report_path.as_uri() if run.report_path.is_absolute()
                           else run.report_path.as_posix())
        report = f" · <a href='{href}' target='_blank'>report.html</a>"
    return (f"<div><b>Run</b> <code>{html.escape(str(run.path))}</code>{report}"
            f"<table>{cells}</table></div>")
