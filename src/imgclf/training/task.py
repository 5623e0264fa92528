"""Single-label vs multi-label: targets, loss, activation and the metric that picks the best epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.samples import Sample


@dataclass(frozen=True)
class Task:
    """What differs between single-label and multi-label classification.

    Attributes:
        classes: Class names in output order.
        multi_label: Sigmoid + BCE (any number of labels) instead of softmax + cross-entropy.
        label_smoothing: Cross-entropy label smoothing (single-label only).
    """

    classes: tuple[str, ...]
    multi_label: bool = False
    label_smoothing: float = 0.0

    @property
    def name(self) -> str:
        return "multi_label" if self.multi_label else "single_label"

    @property
    def monitor(self) -> str:
        """Validation metric (higher is better) that selects the best epoch."""
        return "valid_zero_one_accuracy" if self.multi_label else "valid_accuracy"

    def encode(self, samples: list[Sample]) -> torch.Tensor:
        """Targets for samples: class indices (single) or multi-hot float rows (multi)."""
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multi_label:
            return torch.tensor([index[s.label] for s in samples], dtype=torch.long)
        out = torch.zeros(len(samples), len(self.classes), dtype=torch.float32)
        for i, s in enumerate(samples):
            for lab in s.labels:
                out[i, index[lab]] = 1.0
        return out

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss; soft targets (mixup) are float rows of the same shape as the logits."""
        logits = logits.float()
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=weight)
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def targets_numpy(self, targets: torch.Tensor) -> np.ndarray:
        """Targets as evaluation expects them: int [N] or {0,1} [N, C]."""
        t = targets.cpu().numpy()
        return t.astype(np.int64) if self.multi_label else t.astype(np.int64).reshape(-1)
