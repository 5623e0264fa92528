"""What every training stage reports per epoch: a metrics.csv row, and the best epoch so far."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgclf import evaluation
from imgclf.training.task import Task


@dataclass
class EpochRow:
    """One line of metrics.csv."""

    epoch: int
    stage: str
    lr: float
    train_loss: float
    valid_loss: float
    metrics: dict[str, float]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch, "stage": self.stage, "lr": self.lr,
            "train_loss": self.train_loss, "valid_loss": self.valid_loss,
            **self.metrics, "seconds": self.seconds,
        }


@dataclass
class Best:
    """The best epoch so far: full-model weights and its validation probabilities."""

    score: float = -math.inf
    loss: float = math.inf
    epoch: int = -1
    stage: str = ""
    state: dict[str, torch.Tensor] | None = None
    probs: np.ndarray | None = None

    def offer(self, score: float, loss: float, epoch: int, stage: str, model: nn.Module,
              probs: np.ndarray) -> bool:
        """Keep this epoch if it beats the best (ties go to the lower validation loss)."""
        if score > self.score + 1e-12 or (abs(score - self.score) <= 1e-12 and loss < self.loss):
            self.score, self.loss, self.epoch, self.stage = score, loss, epoch, stage
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.probs = probs
            return True
        return False


def score_validation(task: Task, logits: torch.Tensor,
                     targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Validation probabilities, targets as evaluation expects them, and the flat
    `valid_*` metrics of a metrics.csv row (valid_loss included)."""
    probs = task.activate(logits).cpu().numpy()
    y = task.targets_numpy(targets)
    scores = evaluation.metrics(evaluation.Predictions(
        paths=[""] * len(probs), classes=list(task.classes), probs=probs, targets=y,
        multi_label=task.multi_label))
    flat = {f"valid_{k}": float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n_samples"}
    return probs, y, flat


# An unfrozen epoch this far below the frozen stage is called out: past run-to-run noise on a
# few hundred validation images, and what issue 21's collapses looked like from their start.
FINE_TUNE_DROP_WARNING = 0.03


def fine_tuning_check(rows: list[EpochRow], monitor: str, best_stage: str,
                      tolerance: float = FINE_TUNE_DROP_WARNING) -> dict | None:
    """Whether unfreezing the body helped, measured against the frozen stage.

    Only the final stage's epochs count: with progressive resizing the earlier, smaller sizes
    are expected to score lower and can never be kept.

    Args:
        rows: The run's epochs, frozen stage first.
        monitor: The metric that ranks epochs (a metrics.csv column).
        best_stage: Stage of the kept epoch.
        tolerance: Largest drop below the frozen stage that passes without a warning.

    Returns:
        None without both a frozen and an unfrozen epoch; else the frozen stage's score, the
        best and last unfrozen scores, the largest drop and its epoch, whether fine-tuning
        helped (an unfrozen epoch was kept), and plain-language warnings.
    """
    frozen = [r for r in rows if r.stage == "frozen" and monitor in r.metrics]
    final = rows[-1].stage if rows else None
    unfrozen = [r for r in rows if r.stage == final and r.stage != "frozen"
                and monitor in r.metrics]
    if not frozen or not unfrozen:
        return None
    base = max(r.metrics[monitor] for r in frozen)
    worst = min(unfrozen, key=lambda r: r.metrics[monitor])
    top = max(unfrozen, key=lambda r: r.metrics[monitor])
    drop = base - worst.metrics[monitor]
    name = monitor.removeprefix("valid_").replace("_", " ")
    warnings = []
    if drop > tolerance:
        warnings.append(
            f"unfreezing the body made the model worse: {name} fell to "
            f"{worst.metrics[monitor]:.3f} at epoch {worst.epoch}, {100 * drop:.1f} points below "
            f"the frozen stage's {base:.3f}")
    helped = best_stage != "frozen"
    if not helped:
        warnings.append(
            f"fine-tuning did not help: the kept model is the frozen stage's (a new head on the "
            f"pretrained body, {name} {base:.3f}); the best unfrozen epoch reached "
            f"{top.metrics[monitor]:.3f}. Try a larger --lr-mult (gentler rates for the "
            f"body), fewer --epochs, or --batchnorm adapt for data unlike ImageNet")
    return {"monitor": monitor, "frozen": round(base, 6),
            "best_unfrozen": round(top.metrics[monitor], 6),
            "last_unfrozen": round(unfrozen[-1].metrics[monitor], 6),
            "largest_drop": round(drop, 6), "largest_drop_epoch": worst.epoch,
            "helped": helped, "warnings": warnings}
