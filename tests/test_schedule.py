"""one_cycle(step) against torch's OneCycleLR, which it replaces."""

import numpy as np
import pytest
import torch

from imgclf.training.schedule import one_cycle


def torch_one_cycle(total, peak, pct_start, div, final_div):
    """(lr, momentum) before every step and after the last, as OneCycleLR sets them on AdamW."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peak, total_steps=total, pct_start=pct_start, div_factor=div,
        final_div_factor=final_div / div, cycle_momentum=True, base_momentum=0.85,
        max_momentum=0.95)
    out = []
    for step in range(total + 1):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        if step < total:
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize("total,pct_start,div,final_div", [
    (100, 0.3, 25.0, 1e5),  # fastai's fit_one_cycle
    (37, 0.99, 25.0, 1e5),  # the frozen head: warm-up over almost every step
    (30, 0.25, 25.0, 1e5),  # the unfrozen stage
    (12, 0.2, 5.0, 1e5),  # a restarted progressive-resizing stage
    (7, 0.3, 5.0, 1e3),
    (2, 0.3, 25.0, 1e5),  # warm-up shorter than a step
    (1, 0.3, 25.0, 1e5),
])
def test_one_cycle_equals_torch_one_cycle_lr(total, pct_start, div, final_div):
    expected = torch_one_cycle(total, 3e-3, pct_start, div, final_div)
    got = [one_cycle(s, total, 3e-3, pct_start, div, final_div) for s in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)


def test_one_cycle_where_one_cycle_lr_divides_by_zero():
    # 4 steps at pct_start 0.25: the warm-up ends at step 0 and OneCycleLR divides by zero.
    with pytest.raises(ZeroDivisionError):
        torch_one_cycle(4, 1e-2, 0.25, 25.0, 1e5)
    got = [one_cycle(s, 4, 1e-2, 0.25, 25.0, 1e5) for s in range(5)]
    # It is the limit of OneCycleLR as the warm-up shrinks to that single step.
    expected = torch_one_cycle(4, 1e-2, 0.25 * (1 + 1e-12), 25.0, 1e5)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[0] == pytest.approx((1e-2 / 25, 0.95)) and got[1][0] < 1e-2


def test_one_cycle_shape():
    total, peak = 50, 1e-2
    lrs, moms = zip(*(one_cycle(s, total, peak, 0.3) for s in range(total)))
    top = max(range(total), key=lambda s: lrs[s])
    assert lrs[0] == pytest.approx(peak / 25) and lrs[top] == pytest.approx(peak, rel=0.01)
    assert lrs[-1] == pytest.approx(peak / 1e5, rel=0.01)
    assert moms[0] == pytest.approx(0.95) and moms[top] == pytest.approx(0.85, abs=1e-3)
    assert moms[-1] == pytest.approx(0.95, abs=1e-3)
