"""The unfrozen stage's length: chosen from the frozen stage's score, or planned to a time budget."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from imgclf.config import TrainConfig, parse_duration
from imgclf.errors import ImgclfError
from imgclf.training import budget
from imgclf.training.schedule import one_cycle, stretch


@pytest.mark.parametrize("score, epochs", [(0.984, 2), (0.992, 2), (0.921, 3), (0.905, 3),
                                           (0.846, 5), (0.2, 5), (1.0, 2), (float("nan"), 5)])
def test_auto_epochs_grow_with_the_error_the_frozen_head_leaves(score, epochs):
    assert budget.auto_epochs(score) == epochs


def test_auto_epochs_respect_the_cap():
    assert budget.auto_epochs(0.5, most=4) == 4


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("5m", 300), ("2min", 120),
                                           ("1h30m", 5400), ("1.5h", 5400), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5x", "-3m", "0", "h", "1m-"])
def test_bad_durations_are_refused_with_the_flag(text):
    with pytest.raises(ImgclfError, match="--time-budget"):
        parse_duration(text)


def test_time_budget_and_epochs_are_exclusive():
    with pytest.raises(ImgclfError, match="drop --epochs"):
        TrainConfig(data="x", time_budget="5m", epochs=3).check()
    TrainConfig(data="x", time_budget="5m").check()
    with pytest.raises(ImgclfError, match="duration"):
        TrainConfig(data="x", time_budget="five minutes").check()


def test_time_budget_is_refused_for_several_processes(tmp_path):
    from imgclf import api

    with pytest.raises(ImgclfError, match="one process"):
        api.train(tmp_path, time_budget="5m", num_nodes=2)


def _costs(**kw) -> budget.Costs:
    base = dict(left_s=100.0, step_s=1.0, eval_img_s=100.0, steps_per_epoch=10, n_valid=100,
                finish_s=3.0)
    return budget.Costs(**{**base, **kw})


def test_a_plan_fills_the_budget_with_whole_epochs_shortened_equally():
    c = _costs()  # a full epoch: 10 steps + 1 s of validation = 11 s
    plan = budget.plan_budget(c)
    usable = budget.AIM * c.left_s - c.finish_s  # 94 s
    assert plan.epochs == 9 and plan.batches == 9  # 9 epochs of (94/9 - 1) s = 9 steps each
    assert plan.predicted_s == pytest.approx(9 * (9 * 1.0 + 1.0))
    assert plan.predicted_s <= usable < plan.predicted_s + plan.epochs * c.step_s + 1e-9


def test_a_plan_uses_whole_epochs_when_they_fit_exactly():
    c = _costs(left_s=(3 * 11 + 3) / budget.AIM)
    plan = budget.plan_budget(c)
    assert (plan.epochs, plan.batches) == (3, 10)
    assert plan.predicted_s == pytest.approx(33)


def test_no_unfrozen_stage_when_less_than_a_quarter_epoch_fits():
    assert budget.plan_budget(_costs(left_s=5.0)).epochs == 0
    assert budget.plan_budget(_costs(left_s=1.0)).epochs == 0  # already past the finish
    small = budget.plan_budget(_costs(left_s=(3 + 1 + 3) / budget.AIM + 1e-6))
    assert (small.epochs, small.batches) == (1, 3)
    assert "no unfrozen epoch" in budget.plan_budget(_costs(left_s=5.0)).describe()


def test_a_remainder_is_shared_out_over_one_more_epoch():
    c = _costs(steps_per_epoch=40, left_s=(2 * 41 + 0.5 + 3) / budget.AIM)  # 82.5 s usable
    plan = budget.plan_budget(c)
    assert (plan.epochs, plan.batches) == (3, 26)  # 3 x (26 steps + 1 s) = 81 s
    assert budget.plan_budget(c, most_epochs=2).batches == 40


def test_an_extra_epoch_that_costs_many_steps_is_declined():
    # 2-batch epochs (a small data set): 42.5 s usable, a step 3 s, validation 0.5 s. Seven
    # epochs would each get one batch (7 steps); six whole epochs of two train 12.
    c = _costs(steps_per_epoch=2, step_s=3.0, n_valid=50, finish_s=3.0,
               left_s=(42.5 + 3.0) / budget.AIM)
    plan = budget.plan_budget(c)
    assert (plan.epochs, plan.batches) == (6, 2)
    assert plan.predicted_s <= 42.5


def test_when_validation_dominates_one_whole_epoch_beats_two_short_ones():
    # A full epoch: 10 steps + 30 s of validation; 41 s usable. Two epochs would leave
    # no time for steps once each had validated, so the plan is one full epoch.
    c = _costs(steps_per_epoch=10, n_valid=3000, left_s=(41 + 3) / budget.AIM)
    plan = budget.plan_budget(c)
    assert (plan.epochs, plan.batches) == (1, 10)


def test_plans_never_exceed_the_cap():
    plan = budget.plan_budget(_costs(left_s=10_000.0), most_epochs=50)
    assert plan.epochs == 50 and plan.batches == 10


def test_timing_training_steps_leaves_the_model_and_random_state_alone():
    import timm

    from imgclf.data.transforms import Preprocess
    from imgclf.training.features import time_training_steps

    model = timm.create_model("test_efficientnet", num_classes=3)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    pre = Preprocess(size=32, presize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    seconds = time_training_steps(model, loader, pre, "32-true", torch.device("cpu"), steps=2)
    assert seconds > 0
    assert torch.equal(torch.rand(1), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("batches, step_times, expected", [
    # A process's first steps are slow while its heap grows; a stray slow step is one of four.
    (8, [2.0, 1.0, 0.8, 0.9, 0.7, 3.0, 9.0, 9.0], 0.85),
    # Two batches in all (fridgeObjects' epochs): the second step is the one timed.
    (2, [2.0, 1.0], 1.0),
    (1, [2.0], 2.0),
])
def test_step_timing_skips_the_warm_up_and_takes_the_median(monkeypatch, batches, step_times,
                                                            expected):
    import itertools

    import timm

    from imgclf.data.transforms import Preprocess
    from imgclf.training import features

    clock = itertools.accumulate([0.0, *step_times, *[1.0] * 20])
    monkeypatch.setattr(features.time, "perf_counter", lambda: next(clock))
    model = timm.create_model("test_efficientnet", num_classes=3)
    x = torch.randint(0, 255, (4 * batches, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (4 * batches,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    pre = Preprocess(size=32, presize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    got = features.time_training_steps(model, loader, pre, "32-true", torch.device("cpu"))
    assert got == pytest.approx(expected)


@pytest.mark.slow
def test_a_budget_run_records_its_plan_and_a_resumed_one_replays_it(tmp_path, monkeypatch):
    import json

    import timm
    from conftest import make_color_dataset
    from safetensors.torch import save_file
    from test_resume import Killed, crash_at

    from imgclf import api

    data = make_color_dataset(tmp_path / "data", per_class=12)
    torch.manual_seed(1)
    net = timm.create_model("test_efficientnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    opts = dict(model="test_efficientnet", weights=str(weights), size=32, batch_size=8,
                workers=0, seed=0, cache_dir=str(tmp_path / "cache"), time_budget="60s")
    with monkeypatch.context() as m, pytest.raises(Killed):
        crash_at(m, 2, before=True)  # the second unfrozen checkpoint: one epoch done
        api.train(data, out=str(tmp_path / "runs"), name="b", **opts)
    run = tmp_path / "runs" / "b"
    plan = json.loads((run / "checkpoints" / "state.json").read_text())["plan"]
    assert plan["rule"] == "time budget" and plan["epochs"] >= 2
    assert plan["budget_left_s"] < 60 and plan["predicted_s"] <= plan["budget_left_s"]
    api.train(resume=run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["plan"] == plan
    assert metrics["epochs"] == plan["epochs"]

    # Without --epochs or a budget, the frozen stage's validation score chooses the epochs.
    del opts["time_budget"]
    auto = api.train(data, out=str(tmp_path / "runs"), name="auto", **opts).metrics()
    assert auto["plan"]["rule"] == "frozen-stage score"
    assert auto["epochs"] == budget.auto_epochs(auto["plan"]["frozen_score"])


def test_stretch_is_the_identity_without_knots_and_continuous_where_a_plan_changed():
    from imgclf.training.schedule import restretch

    assert stretch(5, None) == 5.0
    # 4 epochs of 10 steps planned (40); after epoch 1 the 3 left get 6 steps each.
    knots = restretch(None, 10, 28, 40)
    assert knots == [(10.0, 10.0), (27.0, 39.0)]
    assert stretch(10, knots) == 10.0 and stretch(27, knots) == 39.0
    assert stretch(28, knots) == 40.0  # the rate an optimizer shows once the fit ended
    # Re-planned again after epoch 2 (16 steps done): the position reached carries over.
    again = restretch(knots, 16, 30, 40)
    assert stretch(16, again) == pytest.approx(stretch(16, knots))
    assert stretch(29, again) == 39.0 and stretch(12, again) == stretch(12, knots)
    rates = [one_cycle(stretch(s, again), 40, 1.0)[0] for s in range(30)]
    assert rates[-1] == pytest.approx(1e-5)  # annealed on the new last step
    assert max(abs(a - b) for a, b in zip(rates, rates[1:])) < 0.2  # no jump


def test_replanning_shares_the_time_left_at_the_last_epochs_pace():
    # 20 s per 10-step epoch (2 s of it validation): 1.8 s a step.
    n = budget.replan_batches(left_s=60, epochs_left=2, epoch_s=20, batches=10, valid_s=2,
                              finish_s=3, steps_per_epoch=16)
    assert n == int(((0.97 * 60 - 3) / 2 - 2) // 1.8) == 14
    # Never more than a full epoch, never fewer than one batch.
    assert budget.replan_batches(1000, 1, 20, 10, 2, 3, 16) == 16
    assert budget.replan_batches(1, 3, 20, 10, 2, 3, 16) == 1


class _Trainer(SimpleNamespace):
    """What the replanner reads of a Lightning trainer after its first epoch of 10 steps (4
    planned); max_epochs is the fit loop's, as in Lightning."""

    @property
    def max_epochs(self) -> int:
        return self.fit_loop.max_epochs


def _replanner(monkeypatch):
    """A Replanner with a 100 s deadline (3 s finish, 2 s validation, 10-step epochs) on a
    clock the test sets, the trainer and module it re-plans, and the changes it records."""
    from imgclf.training import replan

    clock = {"t": 0.0}
    monkeypatch.setattr(replan.time, "monotonic", lambda: clock["t"])
    changes: list = []
    planner = replan.Replanner(deadline=100.0, finish_s=3.0, valid_s=2.0, steps_per_epoch=10,
                               on_change=lambda *a: changes.append(a))
    trainer = _Trainer(current_epoch=0, num_training_batches=10, global_step=10,
                       limit_train_batches=10, should_stop=False,
                       fit_loop=SimpleNamespace(max_epochs=4))
    module = SimpleNamespace(knots=None, cycle_total=40, epoch_offset=1)
    return clock, changes, planner, trainer, module


def test_the_replanner_sets_the_next_epochs_and_stops_when_nothing_fits(monkeypatch):
    clock, changes, planner, trainer, module = _replanner(monkeypatch)
    clock["t"] = 30.0  # the first epoch took 30 s, not the 24 planned
    planner.after_epoch(trainer, module)
    expected = budget.replan_batches(70.0, 3, 30.0, 10, 2.0, 3.0, 10)
    assert budget.replan(70.0, 3, 30.0, 10, 2.0, 3.0, 10) == (3, expected)
    assert trainer.limit_train_batches == expected < 10
    assert trainer.fit_loop.max_epochs == 4  # the epochs stay, shorter
    assert module.knots == [(10.0, 10.0), (9.0 + 3 * expected, 39.0)]
    assert changes[-1][3] == {"after_epoch": 1, "epoch_s": 30.0, "batches": expected,
                              "epochs": 4}
    # Late: not even one more batch and its validation fit before the finish.
    trainer.current_epoch, trainer.num_training_batches = 1, expected
    clock["t"] = 96.0
    planner.after_epoch(trainer, module)
    assert trainer.should_stop


def test_epochs_faster_than_timed_grow_the_stage_to_the_budget(monkeypatch):
    # 4 epochs planned at 24 s; the first took 12 s (10 steps at 1 s, 2 s validation): the
    # 88 s left, less 3 s of finish, buy 7 more epochs of 9 batches (63 steps, more than 6
    # whole epochs' 60), not the 3 planned.
    more, batches = budget.replan(88.0, 3, 12.0, 10, 2.0, 3.0, 10)
    assert (more, batches) == (7, 9)
    assert more * budget.epoch_seconds(budget.Costs(0, 1.0, 0.5, 10, 1, 0), batches) <= (
        0.97 * 88 - 3)
    assert budget.replan(88.0, 3, 12.0, 10, 2.0, 3.0, 10, most_epochs=4) == (4, 10)

    clock, changes, planner, trainer, module = _replanner(monkeypatch)
    clock["t"] = 12.0
    planner.after_epoch(trainer, module)
    assert trainer.fit_loop.max_epochs == 8 and trainer.limit_train_batches == 9
    # The 40-step cycle planned now ends on step 72, the last of the 7 more epochs.
    assert module.knots == [(10.0, 10.0), (72.0, 39.0)]
    assert changes[-1][0] == 8 and changes[-1][3]["epochs"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("grow", [0, 1], ids=["shortened", "grown"])
def test_a_replanned_budget_run_anneals_at_its_new_end_and_resumes_exactly(tmp_path, monkeypatch,
                                                                            grow):
    """Epochs re-planned after the first, shortened (or shortened and one more: the epochs ran
    faster than timed); fixed plan and re-plan, so the run is deterministic. A copy killed
    after the re-plan and resumed ends with the same numbers."""
    import csv
    import json

    import timm
    from conftest import make_color_dataset
    from safetensors.torch import save_file
    from test_resume import RUN, Killed, crash_at, read_metrics

    from imgclf import api

    data = make_color_dataset(tmp_path / "data", per_class=12)
    torch.manual_seed(1)
    net = timm.create_model("test_efficientnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    opts = {**{k: v for k, v in RUN.items() if k not in ("epochs", "checkpoint_every")},
            "weights": str(weights), "cache_dir": str(tmp_path / "cache"), "workers": 0,
            "time_budget": "10m"}
    monkeypatch.setattr(budget, "plan_budget", lambda c, most_epochs=50: budget.Plan(
        3, c.steps_per_epoch, c.steps_per_epoch, 1.0, c.left_s))
    replans: list[int] = []

    def replan(left_s, epochs_left, *args, **kwargs):
        replans.append(epochs_left)  # one more epoch at the first re-plan only
        return epochs_left + (grow if len(replans) == 1 else 0), 2

    monkeypatch.setattr(budget, "replan", replan)
    ref = api.train(data, out=str(tmp_path / "runs"), name="ref", **opts).path
    plan = json.loads((ref / "metrics.json").read_text())["plan"]
    assert plan["batches"] == 2 and [r["batches"] for r in plan["replans"]] == [2]
    assert plan["epochs"] == 3 + grow
    with open(ref / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r["stage"] == "unfrozen"]
    # 7 steps, then 2 a epoch (11 or 13 steps in all) walk the cycle planned for 21: the rates
    # shown after each epoch are the cycle's at the stretched positions (pct_start 0.3, div 5
    # after a frozen stage), 21 after the last step, as for a fit that was never re-planned.
    knots = plan["knots"]
    last = 7 + 2 * (2 + grow)
    assert knots == [[7.0, 7.0], [last - 1.0, 20.0]]
    expected = [one_cycle(stretch(s, knots), 21, 1.0, 0.3, 5.0)[0]
                for s in range(7, last + 1, 2)]
    assert len(lrs) == 3 + grow
    # metrics.csv keeps 6 significant digits.
    assert [lr / lrs[0] for lr in lrs] == pytest.approx([e / expected[0] for e in expected],
                                                        rel=1e-5)

    replans.clear()
    with monkeypatch.context() as m, pytest.raises(Killed):
        crash_at(m, 2, before=True)  # epoch 1 and its re-plan saved, killed before epoch 2's
        api.train(data, out=str(tmp_path / "runs"), name="killed", **opts)
    killed = tmp_path / "runs" / "killed"
    assert json.loads((killed / "checkpoints" / "state.json").read_text())["plan"]["batches"] == 2
    api.train(resume=killed)
    assert read_metrics(killed) == read_metrics(ref)


@pytest.mark.parametrize("n, batch", [(86, 32), (64, 32), (20, 32), (32, 32), (33, 32)])
def test_planned_steps_are_the_training_loaders_own(n, batch):
    from imgclf.data.datasets import make_loader, train_steps

    data = torch.utils.data.TensorDataset(torch.zeros(n, 1))
    assert train_steps(n, batch) == len(make_loader(data, batch, train=True, workers=0))


def test_the_command_counts_its_budget_from_the_process_start(tmp_path, monkeypatch):
    """`imgclf train --time-budget` hands the library the time the command line was imported
    (the installed script: the process's start); `main()` called from Python hands None, so
    the budget counts from the call."""
    from typer.testing import CliRunner

    import importlib

    from imgclf import api

    cli = importlib.import_module("imgclf.cli.app")  # the package exports the Typer app as app

    seen = []
    monkeypatch.setattr(api, "train", lambda **kw: seen.append(kw.get("budget_start")))
    args = ["train", str(tmp_path), "--time-budget", "5m"]
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    monkeypatch.setitem(cli._budget_start, "at", cli._IMPORTED)
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    assert seen == [None, cli._IMPORTED]


def test_a_budget_start_in_the_past_counts_against_the_budget(tmp_path, monkeypatch):
    from imgclf.commands import train as train_cmd

    deadlines = []
    monkeypatch.setattr(train_cmd, "_train", lambda *a, deadline=None, **k: deadlines.append(
        deadline))
    monkeypatch.setattr(train_cmd.tracking, "connect", lambda *a, **k: contextlib.nullcontext())
    train_cmd.train(tmp_path, time_budget="5m", budget_start=100.0)
    assert deadlines == [400.0]
