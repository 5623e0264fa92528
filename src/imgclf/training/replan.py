"""A time budget's unfrozen stage, re-planned after every epoch from what the epoch took.

The budget's first plan (imgclf.training.budget.plan_budget) extrapolates from a few steps
timed on a copy of the model before the stage starts. Real epochs then run at their own pace,
so after each one the time left is shared again between the epochs left
(`budget.replan`: shorter epochs, or more of them where the epochs ran faster than timed), and
the one-cycle is stretched to end on the new last step (`schedule.restretch`): the rate stays
continuous and still anneals at the budget's end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from imgclf.training import budget
from imgclf.training.schedule import restretch

log = logging.getLogger(__name__)


class Replanner:
    """After each epoch but the last, sets the next epochs' batches and the cycle's knots, or
    stops the fit when not even one more batch fits (it replaces History's stop guard).

    Called from the stage's row callback; the trainer must reload its training loader every
    epoch (`reload_dataloaders_every_n_epochs=1`), so that a changed `limit_train_batches`
    takes effect.

    Args:
        deadline: The budget's end, as time.monotonic().
        finish_s: What the run does after training (`budget.finish_seconds`).
        valid_s: What a validation pass takes (from the frozen stage's inference rate).
        steps_per_epoch: Steps in a full epoch.
        on_change: Called with (epochs, batches, knots, record) after a re-plan (epochs: the
            fit's in all), to keep them where a resumed run reads its plan.
    """

    def __init__(self, deadline: float, finish_s: float, valid_s: float, steps_per_epoch: int,
                 on_change: Callable[[int, list, dict], None]):
        self.deadline, self.finish_s, self.valid_s = deadline, finish_s, valid_s
        self.steps_per_epoch, self.on_change = steps_per_epoch, on_change
        self._last_end = time.monotonic()

    def after_epoch(self, trainer, module) -> None:
        """Re-plan once an epoch's row is written (before its checkpoint is)."""
        now = time.monotonic()
        epoch_s, self._last_end = now - self._last_end, now
        ran = int(trainer.current_epoch) + 1
        left = int(trainer.max_epochs) - ran
        if left <= 0:
            return
        batches = int(trainer.num_training_batches)
        epoch = int(module.epoch_offset + trainer.current_epoch)
        step_s = max(1e-9, (epoch_s - self.valid_s) / max(1, batches))
        if now + self.valid_s + step_s > self.deadline - self.finish_s:
            trainer.should_stop = True
            log.warning(f"Stopping after epoch {epoch}: another would end past the time budget")
            return
        more, new = budget.replan(self.deadline - now, left, epoch_s, batches, self.valid_s,
                                  self.finish_s, self.steps_per_epoch,
                                  most_epochs=budget.MOST_EPOCHS - ran)
        if new == batches and more == left:
            return
        done = int(trainer.global_step)
        module.knots = restretch(module.knots, done, done + more * new, module.cycle_total)
        trainer.limit_train_batches = new
        if more != left:
            # Lightning's fit loop reads its epoch count at every epoch's end.
            trainer.fit_loop.max_epochs = ran + more
        self.on_change(ran + more, new, module.knots,
                       {"after_epoch": epoch, "epoch_s": round(epoch_s, 2), "batches": new,
                        "epochs": ran + more})
        grown = f" (planned: {left})" if more != left else ""
        log.info(f"Time budget: epoch {epoch} took {epoch_s:.0f} s; {more} more epoch"
                 f"{'s' if more != 1 else ''}{grown} of {new}/{self.steps_per_epoch} batches "
                 "each")
