"""The unfrozen stage's length: chosen from the frozen stage's score, or planned to a time budget."""

from __future__ import annotations

import copy

import pytest
import torch

from imgclf.config import TrainConfig, parse_duration
from imgclf.errors import ImgclfError
from imgclf.training import budget


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
