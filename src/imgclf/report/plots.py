"""Static PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgclf.io import atomic_write  # noqa: E402


def save(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _stage_bounds(rows: list[dict]) -> list[tuple[float, str]]:
    """(x, label) where the stage changes, for vertical markers."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        if row.get("stage") != prev.get("stage"):
            out.append((row["epoch"] - 0.5, str(row.get("stage"))))
    return out


def curves(rows: list[dict], metric: str):
    """Loss (train, valid) and a validation metric per epoch, stage changes marked."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [r["epoch"] for r in rows]
    ax1.plot(x, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(x, [r["valid_loss"] for r in rows], "o-", label="valid")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax2.plot(x, [r.get(metric, np.nan) for r in rows], "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel=metric.replace("valid_", ""), title=metric)
    for ax in (ax1, ax2):
        for bx, label in _stage_bounds(rows):
            ax.axvline(bx, color="grey", ls="--", lw=1)
            ax.text(bx, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.tight_layout()
    return fig


def lr_find(lrs: list[float], losses: list[float], chosen: float):
    """The LR range test: loss against learning rate (log scale), the chosen rate marked."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
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
    side = min(22, max(4.5, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    data = cm.astype(float)
    if normalized:
        data = data / np.maximum(data.sum(1, keepdims=True), 1)
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), classes, fontsize=8 if n > 20 else 10)
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
