"""The frozen stage's plain loop on cached features: LR rule, range test, view sampler, training."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from imgclf.training.epochs import Best
from imgclf.training.frozen_head import (ViewSampler, head_passes, lr_range_test, train_head,
                                valley_lr)
from imgclf.training.task import Task


def separable_features(n: int = 96, dim: int = 16, classes: int = 3, seed: int = 0):
    """Features whose class is written in a few dimensions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g) * 0.5
    x[torch.arange(n), y] += 3.0
    return x, y


def test_valley_picks_the_steep_descent_not_the_minimum():
    lrs = np.logspace(-6, 0, 100)
    # Flat, then a long descent from 1e-4 to 1e-1, then an explosion.
    losses = np.where(lrs < 1e-4, 2.0, 2.0 - 1.5 * np.log10(lrs / 1e-4) / 3)
    losses = np.where(lrs > 1e-1, 0.5 + 20 * (lrs - 1e-1), losses)
    lr = valley_lr(lrs, losses)
    assert 1e-4 < lr < 1e-2


def fastai_valley(lrs, losses, num_it=100):
    """fastai's lr_find suggestion written out plainly (its trim, then its nested-loop valley
    rule), as the oracle valley_lr must agree with."""
    lrs, losses = list(lrs)[num_it // 10:-5], list(losses)[num_it // 10:-5]
    n = len(losses)
    start = end = 0
    best_len = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and best_len[i] < best_len[j] + 1:
                best_len[i] = best_len[j] + 1
            if best_len[end] < best_len[i]:
                end, start = i, i - best_len[i]
    third = (end - start) / 3
    return float(lrs[start + int(third) + int(third / 2)])


def caltech_like_curve():
    # A 101-class head: the loss creeps from 4.62 to 4.58 over the flat start, then falls
    # steeply from 1e-3 to 0.3 and explodes.
    lrs = np.logspace(-6, 0, 100)
    creep = 4.62 - 0.04 * (np.log10(lrs) + 6) / 2.6
    steep = 4.58 - 2.0 * (np.log10(lrs) + 3) / 2.5
    return lrs, np.where(lrs < 1e-3, creep, np.where(lrs < 0.3, steep, 2.6 + 3 * (lrs - 0.3)))


def test_valley_is_fastais_suggestion_on_any_curve():
    rng = np.random.default_rng(0)
    lrs = np.logspace(-6, 0, 100)
    for trial in range(30):
        n = int(rng.integers(16, 101))
        # Noisy U-shaped curves, cut short where a range test would stop.
        x = np.linspace(0, 1, n)
        losses = 2 - 1.5 * np.sin(np.pi * x * rng.uniform(0.5, 1)) + rng.normal(0, 0.05, n)
        assert valley_lr(lrs[:n], losses) == fastai_valley(lrs[:n], losses), trial
    lrs, losses = caltech_like_curve()
    assert valley_lr(lrs, losses) == fastai_valley(lrs, losses)


def test_valley_trims_the_curve_as_fastai_does():
    lrs = np.logspace(-6, 0, 100)
    # Only the trimmed points fall: the first tenth and the last five do not count.
    losses = np.full(100, 2.0)
    losses[:10] = np.linspace(5, 2.1, 10)
    losses[95:] = np.linspace(1.9, 0.1, 5)
    assert valley_lr(lrs, losses) == lrs[10]
    # From the first NaN on, nothing counts.
    losses = np.linspace(3, 1, 100)
    losses[50] = np.nan
    assert valley_lr(lrs, losses) == fastai_valley(lrs[:55], losses[:55])
    # A test that diverged at once leaves nothing after the trim: the smallest rate tried.
    assert valley_lr(lrs[:8], losses[:8]) == lrs[0]


@pytest.mark.xfail(strict=True, reason=(
    "fastai's exact valley rule suggests 9.3e-4 on this curve: the creep over the flat start "
    "belongs to the longest decreasing stretch, whose middle lies on the creep. The rule is "
    "kept as fastai computes it; this test records the case it gets wrong."))
def test_valley_on_a_caltech_like_curve_is_on_the_steep_part():
    lrs, losses = caltech_like_curve()
    assert 3e-3 < valley_lr(lrs, losses) < 1e-1


def test_view_sampler_cycles_views_and_repeats_passes():
    s = ViewSampler(n=5, views=2, seed=0, passes=3)
    s.set_epoch(0)
    first = list(s)
    assert len(first) == 15 and sorted(set(first)) == [0, 1, 2, 3, 4]
    s.set_epoch(1)
    assert sorted(set(s)) == [5, 6, 7, 8, 9]
    s.set_epoch(0)
    assert list(s) == first


def test_head_passes_gives_enough_steps():
    assert head_passes(86, 32, 60) == 30
    assert head_passes(10_000, 32, 60) == 1


def test_lr_range_test_restores_the_head_and_finds_a_usable_rate():
    x, y = separable_features()
    torch.manual_seed(0)
    head = nn.Linear(16, 3)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    lr, lrs, losses = lr_range_test(head, Task(("a", "b", "c")), x, y, batch_size=16, seed=0)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(lrs) == len(losses) > 10 and np.all(np.diff(lrs) > 0)
    assert lrs[0] == 1e-6 and np.isfinite(losses).all()
    # The rate is on the descent: well above the flat start, below the end of the sweep.
    assert 1e-4 < lr < lrs[-1]
    assert losses[np.searchsorted(lrs, lr)] < losses[0]
    # Same seed, same curve: the range test is deterministic.
    lr2, _, losses2 = lr_range_test(head, Task(("a", "b", "c")), x, y, batch_size=16, seed=0)
    assert lr2 == lr and np.array_equal(losses2, losses)


def test_lr_range_test_stops_when_the_loss_explodes():
    x, y = separable_features()
    head = nn.Linear(16, 3)
    _, lrs, losses = lr_range_test(head, Task(("a", "b", "c")), x, y, batch_size=16, seed=0,
                                   max_lr=1e4, steps=200)
    assert len(lrs) < 200 and losses[-1] > 4 * losses.min()


def test_train_head_writes_a_row_per_epoch_and_keeps_the_best():
    x, y = separable_features()
    xv, yv = separable_features(seed=1)
    task = Task(("a", "b", "c"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(16, 3))
    rows, best, seen = [], Best(), []
    interrupted = train_head(
        model[1], task, TensorDataset(torch.cat([x, x + 0.01]), torch.cat([y, y])), (xv, yv),
        epochs=2, lr=1e-2, sampler=ViewSampler(len(x), 2, seed=0, passes=8), batch_size=16,
        rows=rows, best=best, full_model=model,
        on_row=lambda row, improved: seen.append((row.epoch, improved)))
    assert not interrupted
    assert [r.epoch for r in rows] == [0, 1] and {r.stage for r in rows} == {"frozen"}
    assert seen[0] == (0, True)
    assert rows[-1].metrics["valid_accuracy"] >= 0.95
    assert all(math.isfinite(r.train_loss) and r.seconds >= 0 for r in rows)
    # Fastai's frozen schedule: the rate ends far below the peak.
    assert rows[-1].lr < 1e-2 / 100
    assert best.probs.shape == (len(xv), 3) and best.state is not None
    assert set(best.state) == set(model.state_dict())


def test_train_head_class_weights_shift_the_decision():
    # An ambiguous feature (all zeros) for every image: the weighted class wins it.
    x = torch.zeros(64, 4)
    y = torch.tensor([0, 1] * 32)
    task = Task(("a", "b"))
    for weight, expected in ((torch.tensor([1.0, 4.0]), 1), (torch.tensor([4.0, 1.0]), 0)):
        torch.manual_seed(0)
        head = nn.Linear(4, 2)
        rows, best = [], Best()
        train_head(head, task, TensorDataset(x, y), (x[:2], y[:2]), epochs=1, lr=5e-2,
                   sampler=ViewSampler(64, 1, seed=0, passes=4), batch_size=16, rows=rows,
                   best=best, full_model=head, on_row=lambda *_: None, class_weight=weight)
        assert int(head(torch.zeros(1, 4)).argmax()) == expected
