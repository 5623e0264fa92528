"""The frozen stage's classifier, trained on cached body features in a plain loop.

With the body frozen (and in eval mode) its pooled features are fixed, so the stage reduces to
a linear model on an [N, F] tensor: a hundred LR-finder steps and a few hundred training steps
cost milliseconds. Lightning's trainer would add seconds of set-up per fit, more than the whole
stage on a small data set, so this loop does the same work directly: AdamW, fastai's
one-cycle, one metrics.csv row per epoch, the best epoch offered to the run's tracker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf.allocator import one_thread
from imgclf.training.epochs import Best, EpochRow, score_validation
from imgclf.training.schedule import one_cycle
from imgclf.training.task import Task


def valley_lr(lrs: np.ndarray, losses: np.ndarray, num_it: int = 100) -> float:
    """The rate fastai's `lr_find` suggests with its default "valley" rule.

    As fastai does, the recorded curve is first trimmed: the first `num_it // 10` points (the
    loss has not started to move), the last five (it is diverging) and anything from the first
    NaN on. On what remains, the rule takes the longest decreasing subsequence of the loss (the
    longest stretch over which it keeps falling, tolerant of noise) and returns the rate half
    way along it: on the descent, well before the minimum where the loss is about to explode.
    A rule on the whole curve is far more stable than the steepest-gradient point.

    Args:
        lrs: Rates tried, in the order tried.
        losses: Smoothed loss at each rate.
        num_it: Steps the range test was asked for (fastai trims a tenth of these, not of the
            points recorded).

    Returns:
        The suggested rate; when the trim leaves nothing (a test that diverged within a few
        steps, where fastai's rule fails), the smallest rate tried, or 1e-3 without any.
    """
    lrs_all = np.asarray(lrs, dtype=float)
    losses = np.asarray(losses, dtype=float)[num_it // 10: -5]
    lrs = lrs_all[num_it // 10: -5]
    nan = np.flatnonzero(np.isnan(losses))
    if len(nan):
        lrs, losses = lrs[: nan[0]], losses[: nan[0]]
    n = len(losses)
    if n == 0:
        return float(lrs_all[0]) if len(lrs_all) else 1e-3
    # length[i]: the longest decreasing subsequence ending at point i; the first longest wins.
    length = np.ones(n, dtype=int)
    end = 0
    for i in range(1, n):
        higher = losses[:i] > losses[i]
        if higher.any():
            length[i] = 1 + length[:i][higher].max()
        if length[i] > length[end]:
            end = i
    # fastai measures the stretch from one point before its first (and from 0 when nothing
    # falls); a start of -1 can index the last rate for a stretch of two points. Both kept, so
    # the suggestion is fastai's on every curve.
    start = end - length[end] if end > 0 else 0
    section = (end - start) / 3
    return float(lrs[start + int(section) + int(section / 2)])


def lr_range_test(head: nn.Module, task: Task, feats: torch.Tensor, targets: torch.Tensor,
                  batch_size: int, seed: int, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 100, stop_factor: float = 4.0,
                  beta: float = 0.98) -> tuple[float, np.ndarray, np.ndarray]:
    """LR range test of the classifier on cached features; the head is left as it was.

    The rate grows exponentially from `min_lr` to `max_lr` over `steps` AdamW steps (cycling
    through the shuffled features as often as needed); the loss is smoothed with an
    exponential moving average (bias-corrected) and the test stops once it exceeds
    `stop_factor` times its minimum, as Lightning's and fastai's finders do.

    Returns:
        (valley rate as fastai suggests it, rates tried, smoothed losses).
    """
    snapshot = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=min_lr, weight_decay=0.01)
    loader = DataLoader(TensorDataset(feats, targets), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))

    def batches():
        while True:  # as many passes over the features as the test needs
            yield from loader

    lrs, losses = [], []
    avg, lowest = 0.0, math.inf
    with one_thread():
        for step, (x, y) in zip(range(steps), batches()):
            lr = min_lr * (max_lr / min_lr) ** (step / max(1, steps - 1))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = task.loss(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smoothed = avg / (1 - beta ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            lowest = min(lowest, smoothed)
            if step >= 2 and smoothed > stop_factor * lowest:
                break
    head.load_state_dict(snapshot)
    lrs_a, losses_a = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    return valley_lr(lrs_a, losses_a, steps), lrs_a, losses_a


class ViewSampler(torch.utils.data.Sampler):
    """Epoch e makes `passes` seeded random passes over the N cached features of view e mod K."""

    def __init__(self, n: int, views: int, seed: int, passes: int = 1):
        self.n, self.views, self.seed, self.passes, self.epoch = n, views, seed, passes, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n * self.passes

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        offset = (self.epoch % self.views) * self.n
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(self.passes)])
        return iter((offset + order).tolist())


def head_passes(n: int, batch_size: int, min_steps: int = 500) -> int:
    """Passes over cached features per frozen epoch so the head gets at least `min_steps` steps.

    On features a pass costs microseconds, so the head can be trained to convergence where an
    uncached frozen epoch on a small data set would give it two or three steps. 500 steps, not
    fastai's one epoch: the fine-tuning that follows starts from a converged linear probe (as
    in LP-FT), and the frozen stage alone then scores caltech101_subset 0.922 against 0.851 at
    60 steps, magnetic_tiles 0.846 against 0.679 (benchmarks/finetune_stability.py --head-steps).
    """
    steps = max(1, n // batch_size)
    return max(1, math.ceil(min_steps / steps))


def train_head(
    head: nn.Module,
    task: Task,
    train: TensorDataset,
    valid: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    sampler: ViewSampler,
    batch_size: int,
    rows: list[EpochRow],
    best: Best,
    full_model: nn.Module,
    on_row: Callable[[EpochRow, bool], None],
    class_weight: torch.Tensor | None = None,
    stage: str = "frozen",
) -> bool:
    """Train the classifier on cached features: one-cycle (warm-up over 99% of the steps from
    lr/25, as fastai's frozen epoch), one row per epoch and every epoch offered to `best`.

    Args:
        head: The model's classifier (its parameters are those of `full_model`).
        task: Loss, activation and metrics.
        train: Cached training features of every view, view after view, and their targets.
        valid: Cached validation features and targets.
        epochs: Frozen epochs; epoch e trains on view e mod K (see ViewSampler).
        lr: Peak learning rate.
        sampler: Order of the cached training features, epoch by epoch.
        batch_size: Features per step.
        rows: The run's rows (appended to in place).
        best: Best-epoch tracker shared with the later stages.
        full_model: The whole model, whose weights `best` keeps.
        on_row: Called after each row is added.
        class_weight: Optional per-class loss weights.
        stage: Name written to metrics.csv's stage column.

    Returns:
        Whether Ctrl-C ended the stage early (the rows so far are kept).
    """
    feats, targets = train.tensors
    drop_last = sampler.n > batch_size
    steps_per_epoch = (len(sampler) // batch_size if drop_last
                       else math.ceil(len(sampler) / batch_size))

    def batches():
        # What a DataLoader over `train` with this sampler yields, without its per-item fetch
        # and collate, which cost more than the step itself here (500 steps: 0.15 of 0.45 s).
        order = torch.tensor(list(sampler), dtype=torch.long)
        for k in range(steps_per_epoch):
            idx = order[k * batch_size:(k + 1) * batch_size]
            yield feats[idx], targets[idx]

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    total = max(1, epochs * steps_per_epoch)
    step = 0

    def schedule(step: int) -> None:
        rate, momentum = one_cycle(step, total, lr, pct_start=0.99)
        for g in opt.param_groups:
            g["lr"], g["betas"] = rate, (momentum, *g["betas"][1:])

    schedule(step)
    f_valid, y_valid = valid
    with one_thread():  # a linear head is too small to share between threads
        try:
            for epoch in range(epochs):
                t0 = time.perf_counter()
                sampler.set_epoch(epoch)
                head.train()
                loss_sum, seen, last_lr = 0.0, 0, float("nan")
                for x, y in batches():
                    loss = task.loss(head(x), y, class_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    last_lr = opt.param_groups[-1]["lr"]  # the rate this step used
                    step += 1
                    schedule(step)
                    loss_sum += loss.item() * len(x)
                    seen += len(x)
                head.eval()
                with torch.no_grad():
                    logits = torch.cat([head(f_valid[i:i + 1024])
                                        for i in range(0, len(f_valid), 1024)])
                probs, _, metrics = score_validation(task, logits, y_valid)
                row = EpochRow(
                    epoch=epoch, stage=stage, lr=float(last_lr),
                    train_loss=loss_sum / max(1, seen),
                    valid_loss=metrics.get("valid_loss", float("nan")),
                    metrics={k: v for k, v in metrics.items() if k != "valid_loss"},
                    seconds=round(time.perf_counter() - t0, 3))
                rows.append(row)
                improved = best.offer(metrics.get(task.monitor, -math.inf), row.valid_loss,
                                      row.epoch, stage, full_model, probs)
                on_row(row, improved)
        except KeyboardInterrupt:
            return True
        return False
