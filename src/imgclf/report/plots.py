"""Static PNG plots of a run (matplotlib, no display needed).

Figures are made with `matplotlib.figure.Figure`, not pyplot: PNGs need no backend, and a
notebook user's backend and pyplot's figure registry are left as they were. Jupyter shows them
as images (`ShownFigure._repr_png_`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from imgclf.io import atomic_write

log = logging.getLogger(__name__)


class ShownFigure(Figure):
    """A Figure that Jupyter displays as a PNG whatever the backend: a Figure made outside
    pyplot otherwise shows as text ("<Figure size ...>") until pyplot's inline backend has been
    loaded, which matplotlib now does only when pyplot draws something."""

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """A figure and its axes, as `pyplot.subplots` makes them, outside pyplot."""
    fig = ShownFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically.

    Characters the font lacks (emoji or CJK class names) are drawn as boxes; matplotlib warns
    once per glyph and per draw, which floods a console, so they become one log line per
    figure instead (the HTML report shows the names in the browser's fonts).
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    glyphs = set()
    for w in caught:
        text = str(w.message)
        if text.startswith("Glyph ") and "missing from font" in text:
            glyphs.add(text.split("(", 1)[-1].split(")", 1)[0])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if glyphs:
        log.info("%s: the plot font lacks %d characters of the labels (%s); they show as boxes",
                 path.name, len(glyphs), ", ".join(sorted(glyphs)[:3]))
    return path


def _stage_bounds(rows: list[dict]) -> list[tuple[float, str]]:
    """(x, label) where the stage or the mining round changes, for vertical markers."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        stage_changed = row.get("stage") != prev.get("stage")
        round_changed = row.get("round") not in (None, "") and row.get("round") != prev.get("round")
        if stage_changed or round_changed:
            label = str(row.get("stage"))
            if round_changed and "round" not in label:
                label = f"{label} round {row['round']}"
            out.append((row["epoch"] - 0.5, label))
    return out


def curves(rows: list[dict], metric: str):
    """Loss (train, valid) and validation metrics per epoch; stage and round changes marked.

    Args:
        rows: metrics.csv rows (epoch, stage, train_loss, valid_loss, valid_* ...).
        metric: The metric that selects the best epoch; drawn thicker than the others.
    """
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.6))
    x = [r["epoch"] for r in rows]
    ax1.plot(x, [_num(r.get("train_loss")) for r in rows], "o-", label="train")
    ax1.plot(x, [_num(r.get("valid_loss")) for r in rows], "o-", label="valid")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    names = [k for k in (rows[0] if rows else {}) if k.startswith("valid_") and k != "valid_loss"]
    names = sorted(names, key=lambda k: k != metric)
    for i, name in enumerate(names):
        ax2.plot(x, [_num(r.get(name)) for r in rows], "o-", color=f"C{i + 2}",
                 lw=2.2 if name == metric else 1.2, ms=5 if name == metric else 3,
                 label=name.replace("valid_", ""))
    ax2.set(xlabel="epoch", ylabel="validation metric", title="Validation metrics")
    if names:
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        for bx, label in _stage_bounds(rows):
            ax.axvline(bx, color="grey", ls="--", lw=1)
            ax.text(bx, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
        if x:
            ax.set_xticks(sorted(set(x)))
    ax1.legend()
    fig.tight_layout()
    return fig


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def lr_find(lrs: list[float], losses: list[float], chosen: float):
    """The LR range test: loss against learning rate (log scale), the chosen rate marked."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.axvline(chosen, color="C3", ls="--", label=f"chosen {chosen:.2e}")
    ax.set(xlabel="learning rate", ylabel="loss (smoothed)", title="Learning-rate finder")
    finite = np.asarray(losses)[np.isfinite(losses)]
    if finite.size:
        ax.set_ylim(finite.min() - 0.05 * abs(finite.min()), min(finite.max(), finite[0] * 2.5))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion(cm: np.ndarray, classes: list[str], normalized: bool = False):
    """Confusion matrix heat map with counts (or row fractions) in the cells."""
    n = len(classes)
    # Past ~40 classes the cells are read as colours, not numbers: a bounded figure keeps the
    # PNG small and quick to draw.
    side = min(13, max(4.5, 0.35 * n + 2))
    fig, ax = subplots(figsize=(side, side))
    data = cm.astype(float)
    if normalized:
        data = data / np.maximum(data.sum(1, keepdims=True), 1)
    ax.imshow(data, cmap="Blues")
    fontsize = 10 if n <= 20 else 8 if n <= 40 else 5
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=fontsize)
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="actual",
           title="Confusion matrix" + (" (row-normalised)" if normalized else ""))
    if n <= 30:
        vmax = data.max() if data.size else 1
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                if v:
                    ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center",
                            va="center", fontsize=8, color="white" if v > vmax / 2 else "black")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Curves per class, calibration, thresholds

OVERLAY_MAX = 10  # up to this many classes share one axes; more get small multiples


def _worst(scores: dict[str, float], limit: int) -> list[str]:
    """Class names with the lowest finite score first (undefined scores last), at most `limit`."""
    finite = sorted((v, c) for c, v in scores.items() if v is not None and np.isfinite(v))
    rest = [c for c, v in scores.items() if v is None or not np.isfinite(v)]
    return ([c for _, c in finite] + rest)[:limit]


def _per_class_figure(curves: dict[str, dict], xkey: str, ykey: str, score: str, max_panels: int,
                      title: str, xlabel: str, ylabel: str, diagonal: bool):
    classes = list(curves)
    if len(classes) <= OVERLAY_MAX:
        fig, ax = subplots(figsize=(5.6, 4.2))
        for i, c in enumerate(classes):
            d = curves[c]
            if d[xkey]:
                ax.plot(d[xkey], d[ykey], color=f"C{i % 10}", lw=1.6,
                        label=f"{c} ({score.upper()} {d[score]:.3f})")
        if diagonal:
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(-0.02, 1.02), ylim=(-0.02, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if not diagonal else "lower right")
        fig.tight_layout()
        return fig
    shown = _worst({c: curves[c][score] for c in classes}, max_panels)
    cols = 4
    rows = int(np.ceil(len(shown) / cols))
    fig, axes = subplots(rows, cols, figsize=(10, 2.4 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, c in zip(axes.ravel(), shown):
        d = curves[c]
        if d[xkey]:
            ax.plot(d[xkey], d[ykey], color="C0", lw=1.4)
        if diagonal:
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        value = d[score]
        shown_value = f"{value:.3f}" if value is not None and np.isfinite(value) else "n/a"
        ax.set_title(f"{c}\n{score.upper()} {shown_value}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.03))
    for ax in axes.ravel()[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f"{title}: the {len(shown)} classes with the lowest {score.upper()} "
                 f"(of {len(classes)})", fontsize=10)
    fig.tight_layout()
    return fig


def pr_curves(pr: dict[str, dict], max_panels: int = 12):
    """One-vs-rest precision-recall curves (evaluation.pr_curves data).

    Up to OVERLAY_MAX classes share one plot; with more, a grid shows the `max_panels` classes
    with the lowest average precision.
    """
    return _per_class_figure(pr, "recall", "precision", "ap", max_panels,
                             "Precision-recall", "recall", "precision", diagonal=False)


def roc_curves(roc: dict[str, dict], max_panels: int = 12):
    """One-vs-rest ROC curves (evaluation.roc_curves data), laid out as `pr_curves`."""
    return _per_class_figure(roc, "fpr", "tpr", "auc", max_panels, "ROC",
                             "false positive rate", "true positive rate", diagonal=True)


def calibration(cal: dict, multi_label: bool = False):
    """Reliability diagram (accuracy against confidence per bin) with the ECE, and bin counts."""
    edges = np.asarray(cal["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.asarray(cal["accuracy"], dtype=float)
    conf = np.asarray(cal["confidence"], dtype=float)
    counts = np.asarray(cal["counts"])
    fig, (ax, axc) = subplots(2, 1, figsize=(5.2, 5.4), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    ax.bar(centers[filled], acc[filled], width=width * 0.92, color="C0", alpha=0.8,
           label="observed")
    # The gap is outlined, not filled, so the accuracy bar stays readable where they overlap.
    lo, hi = np.minimum(acc, conf)[filled], np.maximum(acc, conf)[filled]
    ax.bar(centers[filled], hi - lo, bottom=lo, width=width * 0.92, facecolor="none",
           edgecolor="C3", hatch="///", lw=1, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    what = "label present" if multi_label else "prediction correct"
    ax.set(ylabel=f"fraction {what}", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Reliability diagram (ECE {cal['ece']:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    axc.bar(centers, counts, width=width * 0.92, color="grey")
    axc.set(xlabel="probability of each label" if multi_label else "confidence (top probability)",
            ylabel="count")
    axc.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def thresholds(search: dict, classes: list[str], pr: dict[str, dict] | None = None):
    """Multi-label decision thresholds: the searched metric against the threshold, the chosen
    thresholds marked; and per class, precision, recall and F1 against the threshold.

    Args:
        search: ThresholdSearch.to_dict() (thresholds.json).
        classes: Class names.
        pr: evaluation.pr_curves data, for the per-class precision/recall panels.
    """
    grid = np.asarray(search["grid"])
    chosen = np.asarray(search.get("thresholds") or search["per_class_thresholds"])
    metric = search["metric"]
    n_panels = 1 + (min(len(classes), 11) if pr else 0)
    cols = min(4, n_panels)
    rows = int(np.ceil(n_panels / cols))
    fig, axes = subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.5 * rows + 0.3),
                             squeeze=False)
    axes = axes.ravel()
    ax = axes[0]
    ax.plot(grid, search["global_curve"], color="C0", lw=2, label="one threshold")
    ax.axvline(search["global_threshold"], color="C0", ls="--", lw=1)
    if search.get("kept") == "per_class":
        ax.axhline(search["per_class_score"], color="C3", ls=":", lw=1.5,
                   label="per-class thresholds")
    ax.set(xlabel="threshold", ylabel=metric.replace("_", "-"),
           title=f"{metric.replace('_', '-')} (kept: {search.get('kept', '?').replace('_', '-')})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if pr:
        for ax, (j, c) in zip(axes[1:], list(enumerate(classes))[:n_panels - 1]):
            d = pr.get(c) or {}
            t = np.asarray(d.get("thresholds") or [])
            if t.size:
                p = np.asarray(d["precision"])[:-1]
                r = np.asarray(d["recall"])[:-1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
                ax.plot(t, p, color="C0", lw=1.2, label="precision")
                ax.plot(t, r, color="C1", lw=1.2, label="recall")
                ax.plot(t, f1, color="C2", lw=1.8, label="F1")
            ax.axvline(chosen[j], color="C3", ls="--", lw=1)
            ax.set(xlim=(0, 1), ylim=(-0.02, 1.03))
            ax.set_title(f"{c} (t = {chosen[j]:.2f})", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="lower left")
    for ax in axes[n_panels:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Images


def image_grid(images: list[np.ndarray], titles: list[str], ok: list[bool] | None = None,
               cols: int = 4, size: float = 2.4):
    """A grid of images (uint8 [H, W, 3]) with titles; titles red where `ok` is False."""
    n = max(1, len(images))
    cols = min(cols, n)
    rows = int(np.ceil(n / cols))
    fig, axes = subplots(rows, cols, figsize=(size * cols, size * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < len(images):
            if images[k] is not None:
                ax.imshow(images[k])
            good = True if ok is None else ok[k]
            ax.set_title(titles[k], fontsize=7.5, color="black" if good else "#b00020")
    fig.tight_layout()
    return fig


def multilabel_confusion(cm: np.ndarray, classes: list[str], max_panels: int = 24):
    """Per-class 2x2 matrices ([[tn, fp], [fn, tp]]) as small heat maps with counts."""
    shown = list(range(min(len(classes), max_panels)))
    cols = min(6, len(shown))
    rows = int(np.ceil(len(shown) / cols))
    fig, axes = subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, j in zip(axes.ravel(), shown):
        ax.axis("on")
        m = np.asarray(cm[j], dtype=float)
        frac = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for a in range(2):
            for b in range(2):
                ax.text(b, a, f"{int(m[a, b])}", ha="center", va="center", fontsize=9,
                        color="white" if frac[a, b] > 0.5 else "black")
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_title(classes[j], fontsize=8)
    fig.supxlabel("predicted", fontsize=8)
    fig.supylabel("actual", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Multi-label threshold search


def threshold_curves(search, classes: list[str] | None = None, max_classes: int = 11):
    """The searched metric against the decision threshold: one global panel, then one per class.

    The global panel shows the metric with one threshold for every class, the best point marked.
    Each class panel shows that class's curve from the search (its accuracy for "hamming", its
    F1 for "f1_macro", and for "zero_one" the exact-match accuracy as that class's threshold
    moves with the other classes at their per-class candidates). The per-class candidate is the
    point on the curve (filled when kept, hollow when not); the dashed red line is the threshold
    the class actually uses.

    Args:
        search: `evaluation.ThresholdSearch`, or its `to_dict()` (thresholds.json).
        classes: Class names for the panel titles (default: class 0, class 1, ...).
        max_classes: At most this many class panels (the first classes).
    """
    d = search if isinstance(search, dict) else search.to_dict()
    grid = np.asarray(d["grid"], dtype=float)
    pc_t = np.asarray(d["per_class_thresholds"], dtype=float)
    kept = np.asarray(d.get("thresholds") or (
        pc_t if d["kept"] == "per_class" else np.full(len(pc_t), d["global_threshold"])), float)
    names = list(classes) if classes is not None else [f"class {j}" for j in range(len(pc_t))]
    metric = d["metric"].replace("_", "-")
    n_cls = min(len(pc_t), max_classes)
    cols = min(4, 1 + n_cls)
    rows = int(np.ceil((1 + n_cls) / cols))
    fig, axes = subplots(rows, cols, figsize=(2.8 * cols + 0.4, 2.6 * rows + 0.4),
                             squeeze=False)
    axes = axes.ravel()

    ax = axes[0]
    curve = np.asarray(d["global_curve"], dtype=float)
    g = float(d["global_threshold"])
    ax.plot(grid, curve, color="C0", lw=1.8)
    ax.plot([g], [d["global_score"]], "o", color="C3" if d["kept"] == "global" else "grey",
            label=f"global t={g:.2f}: {d['global_score']:.3f}")
    ax.axvline(g, color="C3" if d["kept"] == "global" else "grey", ls="--", lw=1)
    ax.axhline(d["per_class_score"], color="C2", ls=":", lw=1.4,
               label=f"per-class (in-sample): {d['per_class_score']:.3f}")
    ax.set(xlabel="threshold (all classes)", ylabel=metric, xlim=(0, 1),
           title=f"{metric}, kept {d['kept'].replace('_', '-')}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower center")
    ax.grid(alpha=0.3)

    class_label = {"zero_one": "exact match", "hamming": "class accuracy",
                   "f1_macro": "class F1"}.get(d["metric"], metric)
    curves = np.asarray(d["per_class_curves"], dtype=float)
    per_class_kept = d["kept"] == "per_class"
    for j, ax in enumerate(axes[1 : 1 + n_cls]):
        ax.plot(grid, curves[j], color="C0", lw=1.4)
        cand = int(np.argmin(np.abs(grid - pc_t[j])))
        ax.plot([pc_t[j]], [curves[j][cand]], "o", color="C3" if per_class_kept else "grey",
                mfc=None if per_class_kept else "none")
        ax.axvline(kept[j], color="C3", ls="--", lw=1)
        ax.set(xlim=(0, 1), xlabel="threshold", ylabel=class_label)
        title = f"{names[j]}: t = {kept[j]:.2f}"
        if not per_class_kept and not np.isclose(pc_t[j], kept[j]):
            title += f" (own best {pc_t[j]:.2f})"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1 + n_cls :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Hard negative mining


def mining_rounds(rounds: list[dict], baseline: dict | None = None):
    """Hard negative mining: held-out false-positive rate and accuracies per round.

    Args:
        rounds: The rounds of rounds.json (each with round, fp_rate_V, positive_accuracy and
            overall_accuracy).
        baseline: The same numbers before mining, drawn dotted.
    """
    fig, ax = subplots(figsize=(6, 3.6))
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
