"""What every training stage reports per epoch: a metrics.csv row, and the best epoch so far."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgclf import evaluation
from imgclf.tasks import Task


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
