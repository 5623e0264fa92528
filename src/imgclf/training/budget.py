"""How long the unfrozen stage runs: from the frozen stage's result, or from a time budget.

Both are pure functions of measurements the recipe has taken by the time the frozen stage ends
(its validation score, the body's inference rate, a few timed training steps), so they are
tested on numbers, and a resumed run replays the recorded plan instead of planning again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_EPOCHS, MAX_EPOCHS = 2, 5
# Unfrozen epochs per point of validation error the frozen head leaves (see `auto_epochs`).
EPOCHS_PER_ERROR = 30.0
# Aim a little short of the deadline: the estimates are a few measured steps, and a run that
# ends 3% early is better than one that ends 3% late.
AIM = 0.97
# The fewest batches an epoch of a planned run may have, as a share of a full epoch; below
# that, the budget buys no unfrozen stage.
MIN_EPOCH_SHARE = 0.25
# The extra, shortened epoch must keep at least this share of the whole epochs' training steps.
EXTRA_EPOCH_STEPS = 0.95
# A cap on a budget's unfrozen epochs, for budgets far beyond what the data needs.
MOST_EPOCHS = 50


def auto_epochs(frozen_score: float, most: int = MAX_EPOCHS) -> int:
    """Unfrozen epochs when the user gave none: more where the frozen head leaves more to gain.

    What fine-tuning adds grows with the error the head on frozen features leaves: on
    imagenette the head scored 0.984 and five unfrozen epochs added 0.001; on caltech101 0.921
    and +0.018; on magnetic_tiles (greyscale defects, unlike ImageNet) 0.846 and +0.116, most of
    it in the later epochs. So the stage gets ceil(30 x error) epochs, at least 2 and at most
    `most`: 2 at 0.984, 3 at 0.921, 5 at 0.846.

    Args:
        frozen_score: The frozen stage's validation score in [0, 1] (accuracy, or the
            multi-label monitor), higher is better.
        most: The cap (the epochs of the longest default schedule).
    """
    if not math.isfinite(frozen_score):
        return most
    error = min(1.0, max(0.0, 1.0 - frozen_score))
    return int(min(most, max(MIN_EPOCHS, math.ceil(EPOCHS_PER_ERROR * error - 1e-9))))


@dataclass(frozen=True)
class Costs:
    """What the unfrozen stage and the run's end cost, measured when the frozen stage ends.

    Attributes:
        left_s: Seconds from now to the budget's end.
        step_s: One training step of the whole network (forward, backward, optimizer, loading).
        eval_img_s: Images per second the network scores in evaluation.
        steps_per_epoch: Training steps in a full epoch.
        n_valid: Validation images (scored after every epoch).
        finish_s: What the run does after training: predictions, thresholds, report, bundle.
    """

    left_s: float
    step_s: float
    eval_img_s: float
    steps_per_epoch: int
    n_valid: int
    finish_s: float


@dataclass(frozen=True)
class Plan:
    """The unfrozen stage a budget buys: `epochs` epochs of `batches` steps each."""

    epochs: int
    batches: int
    steps_per_epoch: int
    predicted_s: float
    budget_left_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.epochs == 0:
            left = (f"{self.budget_left_s:.0f} s left after the frozen stage buy"
                    if self.budget_left_s > 0 else
                    f"the budget was spent {-self.budget_left_s:.0f} s before the frozen stage "
                    "ended:")
            return (f"time budget: {left} no unfrozen epoch; the model is the frozen stage's "
                    "(a longer --time-budget buys fine-tuning)")
        share = "" if self.batches == self.steps_per_epoch else (
            f" of {self.batches}/{self.steps_per_epoch} batches")
        return (f"time budget plan: {self.epochs} unfrozen epoch{'s' if self.epochs != 1 else ''}"
                f"{share}, about {self.predicted_s:.0f} s of the {self.budget_left_s:.0f} s left "
                "(one-cycle annealed to the plan's end)")


def epoch_seconds(c: Costs, batches: int) -> float:
    """One unfrozen epoch of `batches` steps, its validation pass included."""
    return batches * c.step_s + c.n_valid / max(c.eval_img_s, 1e-9)


def plan_budget(c: Costs, most_epochs: int = MOST_EPOCHS) -> Plan:
    """The longest unfrozen stage that ends, with the run's finish, within the budget.

    Whole epochs first; the time a whole epoch does not fill goes to one more epoch, with all
    epochs shortened to an equal number of batches (each a random subset of the training set,
    since every epoch is reshuffled), so the one-cycle anneals exactly at the budget's end.
    That extra epoch is declined when it would cost more than 5% of the training steps, as it
    does where an epoch is only a few batches and each pays a validation pass (fridgeObjects'
    epochs are 2 batches; a 1-minute budget there was planned as 7 epochs of one batch, 27 s
    of the 47 s left). Nothing is planned when less than a quarter of an epoch fits.

    Args:
        c: The measured costs.
        most_epochs: A cap, for budgets far beyond what the data needs.
    """
    usable = AIM * c.left_s - c.finish_s
    full = epoch_seconds(c, c.steps_per_epoch)
    none = Plan(0, 0, c.steps_per_epoch, 0.0, c.left_s)
    if usable <= 0:
        return none
    valid_s = c.n_valid / max(c.eval_img_s, 1e-9)

    def batches_for(epochs: int) -> int:
        return min(c.steps_per_epoch, int((usable / epochs - valid_s) / max(c.step_s, 1e-9)))

    epochs = min(most_epochs, max(1, math.ceil(usable / full - 1e-9)))
    batches = batches_for(epochs)
    whole = epochs - 1  # the whole epochs that fit, without the extra one
    if whole >= 1 and epochs * batches < EXTRA_EPOCH_STEPS * whole * batches_for(whole):
        epochs, batches = whole, batches_for(whole)
    if batches < max(1, math.ceil(MIN_EPOCH_SHARE * c.steps_per_epoch)):
        if epochs > 1:  # one epoch fewer, each a full one
            epochs, batches = epochs - 1, c.steps_per_epoch
        else:
            return none
    return Plan(epochs, batches, c.steps_per_epoch, epochs * epoch_seconds(c, batches),
                c.left_s)


def replan_batches(left_s: float, epochs_left: int, epoch_s: float, batches: int,
                   valid_s: float, finish_s: float, steps_per_epoch: int) -> int:
    """Batches for each remaining epoch, re-planned from the epoch that just ended.

    The first plan extrapolates from a few steps timed on a copy of the model; epochs then run
    at their own pace (on caltech101 with a 5-minute budget they took 56, 47, 42, 39 and 39 s
    against the 51 s planned, and the run ended 12% early). After every epoch the time left
    is shared again between the epochs left, at the rate the last epoch ran.

    Args:
        left_s: Seconds from now to the budget's end.
        epochs_left: Epochs still to run (at least 1).
        epoch_s: What the last epoch took, from the end of the one before: its steps, its
            validation pass and its checkpoint.
        batches: The steps that epoch ran.
        valid_s: What its validation pass took.
        finish_s: What the run does after training (`finish_seconds`).
        steps_per_epoch: Steps in a full epoch (the most an epoch can have).
    """
    step_s = max(1e-9, (epoch_s - valid_s) / max(1, batches))
    per_epoch = (AIM * left_s - finish_s) / max(1, epochs_left)
    return int(min(steps_per_epoch, max(1, math.floor((per_epoch - valid_s) / step_s))))


def replan(left_s: float, epochs_left: int, epoch_s: float, batches: int, valid_s: float,
           finish_s: float, steps_per_epoch: int,
           most_epochs: int = MOST_EPOCHS) -> tuple[int, int]:
    """(epochs, batches each) for the rest of the stage, re-planned from the epoch that ended.

    Usually the epochs left stay and their length changes (`replan_batches`). Where the
    epochs run faster than the first plan's few timed steps said, so that the time left buys
    more epochs than are left, the stage grows to what `plan_budget` plans now at the pace
    measured: on caltech101 with a 5-minute budget the timed steps predicted 63 s epochs,
    they took 44-50 s, and with its epochs fixed the run ended at 233 s, 22% early.

    Args:
        left_s: Seconds from now to the budget's end.
        epochs_left: Epochs the plan still has (at least 1).
        epoch_s: What the last epoch took (see `replan_batches`).
        batches: The steps that epoch ran.
        valid_s: What its validation pass took.
        finish_s: What the run does after training (`finish_seconds`).
        steps_per_epoch: Steps in a full epoch.
        most_epochs: The most epochs that may still run.
    """
    step_s = max(1e-9, (epoch_s - valid_s) / max(1, batches))
    # A validation pass of valid_s: one "image" at 1/valid_s images a second.
    now = plan_budget(Costs(left_s=left_s, step_s=step_s, eval_img_s=1.0 / max(valid_s, 1e-9),
                            steps_per_epoch=steps_per_epoch, n_valid=1, finish_s=finish_s),
                      max(1, most_epochs))
    if now.epochs > epochs_left:
        return now.epochs, now.batches
    return epochs_left, replan_batches(left_s, epochs_left, epoch_s, batches, valid_s, finish_s,
                                       steps_per_epoch)


def finish_seconds(n_valid: int, eval_img_s: float, tta: int) -> float:
    """What a run spends after training, estimated: TTA passes over the validation images, and
    the report and bundle (about 3 s plus 4 ms per validation image on the 2-core machine this
    was measured on: 3 s for fridgeObjects' 21, 7 s for caltech101's 1010)."""
    return 3.0 + 0.004 * n_valid + tta * n_valid / max(eval_img_s, 1e-9)


def plan_record(plan: Plan | None, epochs: int, rule: str) -> dict:
    """What state.json and metrics.json keep of the unfrozen stage's length."""
    out = {"epochs": int(epochs), "rule": rule}
    if plan is not None:
        out.update(plan.to_dict())
    return out
