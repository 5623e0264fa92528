"""Class imbalance: loss weights, the class-balanced sampler, the auto rule, and their use in training."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from imgclf.training import balance
from imgclf.errors import ImgclfError
from imgclf.training.task import Task


def test_class_weights_make_every_class_weigh_the_same():
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    w = balance.class_weights(y, 4)  # class 3 has no training image
    counts = torch.tensor([60.0, 30.0, 10.0])
    assert torch.allclose(w[:3], 100 / (3 * counts))
    assert w[3] == 1.0
    # Each present class's total weight is the same, so each contributes equally to the loss.
    assert torch.allclose(w[:3] * counts, torch.full((3,), 100 / 3))


def test_weighted_loss_is_the_mean_of_per_class_losses():
    y = torch.tensor([0] * 9 + [1])
    logits = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    task = Task(("a", "b"))
    weighted = task.loss(logits, y, balance.class_weights(y, 2))
    per_sample = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (per_sample[y == 0].mean() + per_sample[y == 1].mean()) / 2
    assert torch.allclose(weighted, expected, atol=1e-6)


def test_multilabel_weights_are_negatives_over_positives():
    y = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    w = balance.class_weights(y, 3)
    assert torch.allclose(w, torch.tensor([1 / 3, 3.0, 1.0]))  # no positives: 1


def test_sampler_draws_classes_equally_often_in_batches():
    y = torch.tensor([0] * 200 + [1] * 50 + [2] * 10)
    sampler = balance.balanced_sampler(y, 3, seed=0)
    assert len(sampler) == len(y)  # an epoch keeps its number of steps
    loader = DataLoader(TensorDataset(torch.arange(len(y)), y), batch_size=26, sampler=sampler)
    seen = torch.zeros(3)
    for epoch in range(20):
        for _, yb in loader:
            seen += torch.bincount(yb, minlength=3)
    freq = seen / seen.sum()
    # 5200 draws: a class's share is 1/3 within about 4 standard errors.
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03), freq
    # Without the sampler the smallest class would be under 4% of the draws.
    assert freq[2] > 0.3


def test_sampler_is_seeded_and_epochs_differ():
    y = torch.tensor([0] * 30 + [1] * 5)
    a = balance.balanced_sampler(y, 2, seed=3)
    b = balance.balanced_sampler(y, 2, seed=3)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) != first_a  # the next epoch draws afresh
    assert list(balance.balanced_sampler(y, 2, seed=4)) != first_b


def test_multilabel_sample_weights_favour_rare_labels():
    y = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=torch.float32)
    w = balance.sample_weights(y, 2)
    assert w[3] > w[0]  # carries the rare label
    assert torch.isclose(w[4], w[:4].mean())  # no label: the mean weight


@pytest.mark.parametrize("requested, ratio, multi, expected", [
    ("auto", 10.0, False, balance.AUTO_MODE),
    ("auto", 2.0, False, "none"),
    ("auto", None, False, "none"),
    ("auto", 10.0, True, "none"),
    ("sampler", 1.0, False, "sampler"),
    ("none", 50.0, False, "none"),
])
def test_resolve(requested, ratio, multi, expected):
    assert balance.resolve(requested, ratio, multi) == expected


def test_resolve_rejects_unknown_modes():
    with pytest.raises(ImgclfError, match="--balance must be one of"):
        balance.resolve("oversample", 5.0)


def test_describe_says_what_happens_and_how_to_change_it():
    line = balance.describe("auto", balance.AUTO_MODE, 12.0)
    assert "auto" in line and "--balance none" in line
    assert "no rebalancing" in balance.describe("none", "none", 12.0)
    assert "sampling" in balance.describe("sampler", "sampler", 1.5)


@pytest.mark.slow
def test_training_applies_the_resolved_mode(tmp_path, make_dataset, monkeypatch):
    """auto on 10:1 data picks AUTO_MODE; weights weight the loss of both stages, the sampler
    draws balanced batches in the unfrozen stage (and weights the frozen head's loss)."""
    import timm
    from safetensors.torch import save_file

    from imgclf import api
    from imgclf.commands import train as train_cmd
    from imgclf.training import fine_tune
    from imgclf.training.engine import ClassifierModule

    # The frozen stage needs "pretrained" weights: a random test_resnet saved locally.
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(weights))
    data = make_dataset(tmp_path / "data", {"train/a": 20, "train/b": 2, "valid/a": 3, "valid/b": 3})
    stage_weights, samplers = [], []
    init = ClassifierModule.__init__
    train_head = fine_tune.train_head

    def spy_head(*args, **kw):  # the frozen stage
        stage_weights.append(kw.get("class_weight"))
        return train_head(*args, **kw)

    def spy_module(self, *args, **kw):  # the unfrozen stage
        stage_weights.append(kw.get("class_weight"))
        init(self, *args, **kw)

    make_loader = fine_tune.make_loader

    def spy_loader(dataset, batch_size, train, **kw):
        if train:
            samplers.append(getattr(kw.get("sampler"), "inner", kw.get("sampler")))
        return make_loader(dataset, batch_size, train, **kw)

    monkeypatch.setattr(ClassifierModule, "__init__", spy_module)
    monkeypatch.setattr(fine_tune, "train_head", spy_head)
    monkeypatch.setattr(fine_tune, "make_loader", spy_loader)
    monkeypatch.setattr(train_cmd, "write_report", lambda *a, **k: None)
    common = dict(model="test_resnet", weights=str(weights), size=32, epochs=1, freeze_epochs=1,
                  batch_size=8, lr=1e-3, out=str(tmp_path / "runs"), workers=0)
    other = "sampler" if balance.AUTO_MODE == "weights" else "weights"
    for requested, mode in (("auto", balance.AUTO_MODE), (other, other)):
        stage_weights.clear()
        samplers.clear()
        run = api.train(data, balance=requested, name=requested, **common)
        assert run.metrics()["balance"] == mode
        assert f'"balance": "{mode}"' in (run.path / "data_summary.json").read_text()
        frozen_w, unfrozen_w = stage_weights
        assert torch.allclose(frozen_w, torch.tensor([22 / 40, 22 / 4]))
        balanced = [isinstance(s, torch.utils.data.WeightedRandomSampler) for s in samplers]
        if mode == "weights":
            assert torch.equal(unfrozen_w, frozen_w) and not any(balanced)
        else:
            assert unfrozen_w is None and any(balanced)
