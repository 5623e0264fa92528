"""The one-cycle schedule as a pure function of the step.

A function of (step, total) rather than a stateful scheduler, so a fit that is one stage of a
longer cycle (progressive resizing) or one resumed after a kill simply asks for its step: no
scheduler to rewind, nothing to restore. It computes what torch's `OneCycleLR` does with cosine
annealing and two phases (fastai's `fit_one_cycle`), step for step: a cosine warm-up from
peak / div to peak, then a cosine anneal to peak / final_div, with momentum (AdamW's beta1)
mirrored from 0.95 down to 0.85 and back.
"""

from __future__ import annotations

import math


def _cos(start: float, end: float, pct: float) -> float:
    """Cosine from `start` (pct 0) to `end` (pct 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def one_cycle(step: int, total: int, peak: float, pct_start: float = 0.3, div: float = 25.0,
              final_div: float = 1e5, moms: tuple[float, float] = (0.95, 0.85)
              ) -> tuple[float, float]:
    """Learning rate and momentum of step `step` (0-based) of a one-cycle of `total` steps.

    Args:
        step: Steps taken so far; `total` itself is allowed (the rate after the last step,
            which is what an optimizer shows once a fit ends).
        total: Steps in the whole cycle.
        peak: Highest learning rate, reached at the end of the warm-up.
        pct_start: Fraction of the steps spent warming up.
        div: The rate starts at peak / div.
        final_div: The rate ends at peak / final_div.
        moms: Momentum at the start and end of the cycle, and the one at the peak rate.

    Returns:
        (learning rate, momentum).
    """
    high, low = moms
    # The warm-up ends at this (fractional) step, as OneCycleLR places it; the anneal runs from
    # there to step total - 1.
    warm_end = float(pct_start * total) - 1
    if step <= warm_end:
        # A warm-up ending at step 0 (e.g. 4 steps at pct_start 0.25) is a single step at the
        # starting rate; OneCycleLR divides by zero there.
        pct = step / warm_end if warm_end > 0 else 0.0
        return _cos(peak / div, peak, pct), _cos(high, low, pct)
    pct = (step - warm_end) / (total - 1 - warm_end)
    return _cos(peak, peak / final_div, pct), _cos(low, high, pct)


def cycle_window(fit_steps: int, fit_epochs: int,
                 cycle: tuple[int, int] | None) -> tuple[int, int]:
    """(first step, total steps) of the one-cycle a fit walks.

    A fit of its own walks its whole cycle; a fit that is epochs cycle[0] .. of a cycle of
    cycle[1] epochs (one stage of progressive resizing) starts where the earlier stages ended.
    """
    fit_steps = max(1, int(fit_steps))
    if cycle is None:
        return 0, fit_steps
    per_epoch = fit_steps // max(1, int(fit_epochs))
    return per_epoch * cycle[0], per_epoch * cycle[1]


def stretch(step: float, knots: list | None) -> float:
    """Where in the planned one-cycle step `step` of a re-planned fit is.

    A time budget's plan fixes the cycle's length (in steps) when the unfrozen stage starts;
    re-planning after an epoch changes how many steps are left, not the cycle. `knots` are
    (step, position) pairs, increasing, the last one (new last step, planned last step):
    between knots the position moves linearly, so the rate is continuous where a plan changed
    and the cycle still anneals on the new last step; past the last knot it moves one a step,
    as it does without knots (where the position is the step).
    """
    if not knots:
        return float(step)
    prev_s, prev_p = 0.0, 0.0
    for s, p in knots:
        s, p = float(s), float(p)
        if step <= s:
            return p if s <= prev_s else prev_p + (step - prev_s) * (p - prev_p) / (s - prev_s)
        prev_s, prev_p = s, p
    return prev_p + (step - prev_s)


def restretch(knots: list | None, done: int, steps: int, total: int) -> list:
    """The knots after re-planning when `done` steps are done: the cycle of `total` steps now
    takes `steps` in all, its last step (total - 1) being step steps - 1 (see `stretch`)."""
    kept = [(float(s), float(p)) for s, p in (knots or []) if float(s) < done]
    return [*kept, (float(done), stretch(done, knots)), (float(steps - 1), float(total - 1))]
