"""The moving average of the weights that the unfrozen stage validates and keeps (--ema)."""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


def ema_decay(halflife_epochs: float, steps_per_epoch: float) -> float:
    """Per-step decay of a moving average whose half-life is `halflife_epochs` epochs.

    A half-life in epochs rather than a fixed decay (timm's 0.9998) because imgclf's runs range
    from ten steps an epoch to thousands: a fixed decay would either average nothing on small
    data or lag whole runs behind on large data. The half-life is at least one step.
    """
    return 0.5 ** (1.0 / max(1.0, halflife_epochs * steps_per_epoch))


def frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` that no optimizer sees (it only runs in validation, in eval mode)."""
    copy = deepcopy(net)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


@torch.no_grad()
def update_average(avg: nn.Module, net: nn.Module, decay: float) -> None:
    """avg <- decay * avg + (1 - decay) * net, parameter by parameter.

    Buffers (BatchNorm statistics) are copied, not averaged: held statistics are constant, and
    statistics that train are already a running average of their own.
    """
    torch._foreach_lerp_(list(avg.parameters()), [p.detach() for p in net.parameters()],
                         1.0 - decay)
    for b_avg, b in zip(avg.buffers(), net.buffers()):
        b_avg.copy_(b)
