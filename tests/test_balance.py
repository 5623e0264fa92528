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
def test_training_records_the_resolved_mode(tmp_path, make_dataset, monkeypatch):
    """auto on 10:1 data resolves to AUTO_MODE; the mode a run used is in its metrics.json and
    data_summary.json."""
    from imgclf import api
    from imgclf.commands import train as train_cmd

    monkeypatch.setattr(train_cmd, "write_report", lambda run_dir: None)  # not under test; slow

    data = make_dataset(tmp_path / "data", {"train/a": 20, "train/b": 2, "valid/a": 3, "valid/b": 3})
    other = "sampler" if balance.AUTO_MODE == "weights" else "weights"
    for requested, mode in (("auto", balance.AUTO_MODE), (other, other)):
        run = api.train(data, balance=requested, name=requested, model="test_resnet",
                        pretrained=False, size=32, epochs=1, freeze_epochs=0, batch_size=8,
                        lr=1e-3, out=str(tmp_path / "runs"), workers=0)
        assert run.metrics()["balance"] == mode
        assert f'"balance": "{mode}"' in (run.path / "data_summary.json").read_text()


class CountingDataset(torch.utils.data.Dataset):
    """A training set that counts how often each of its images is read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, torch.zeros(len(inner), dtype=torch.long)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.inner[i]


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """20:2 training images, a test_resnet with local "pretrained" weights (so that the frozen
    stage runs), its preprocessing and the decoded images."""
    import timm
    from conftest import make_dataset
    from safetensors.torch import save_file

    from imgclf.data.cache import decode_all
    from imgclf.data.sources import from_folder
    from imgclf.data.transforms import Preprocess
    from imgclf.training import models

    tmp = tmp_path_factory.mktemp("imbalanced")
    weights = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(weights))
    table = from_folder(make_dataset(tmp / "data", {"train/a": 20, "train/b": 2, "valid/a": 3,
                                                    "valid/b": 3}))
    model = models.create_model("test_resnet", 2, pretrained=True, weights=str(weights))
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    decoded, errors, _ = decode_all([s.path for s in table.samples], pre, None, progress=False)
    assert not errors
    return table, model, pre, decoded, str(weights)


def _fit(imbalanced, mode: str, freeze_epochs: int):
    """fine_tune on the imbalanced set; the epoch rows and, per stage, the reads of each
    training image."""
    import copy

    from imgclf.config import TrainConfig
    from imgclf.data.datasets import ImageDataset
    from imgclf.data.samples import TRAIN, VALID
    from imgclf.data.transforms import eval_transform, train_transform
    from imgclf.training.fine_tune import FitData, fine_tune

    table, model, pre, decoded, weights = imbalanced
    task = Task(tuple(table.classes))
    index = {p: i for i, p in enumerate(decoded.paths)}
    tr, va = table.split(TRAIN), table.split(VALID)
    y_tr, y_va = task.encode(tr), task.encode(va)
    train = CountingDataset(ImageDataset(decoded, [index[s.path] for s in tr], y_tr,
                                         train_transform(pre.size)))
    valid = ImageDataset(decoded, [index[s.path] for s in va], y_va, eval_transform(pre.size))
    cfg = TrainConfig(data="unused", model="test_resnet", weights=weights, size=32, epochs=1,
                      freeze_epochs=freeze_epochs, batch_size=8, lr=1e-3, workers=0,
                      augment_on="loader", precision="32-true", balance=mode)
    reads = {}

    def on_row(row, improved):
        reads[row.stage] = train.reads.clone() - sum(reads.values(), torch.zeros_like(train.reads))

    result = fine_tune(copy.deepcopy(model), task, pre,
                       FitData(train, valid, y_tr, y_va, balance=mode), cfg, None, on_row)
    return result.rows, reads, y_tr


@pytest.mark.slow
def test_weights_weight_both_stages_and_the_sampler_balances_the_unfrozen_one(imbalanced):
    """"weights" weights the loss of both stages; "sampler" weights the frozen head's loss the
    same way and draws class-balanced batches in the unfrozen stage; "none" does neither."""
    runs = {mode: _fit(imbalanced, mode, freeze_epochs=1) for mode in ("none", "weights", "sampler")}
    frozen = {mode: [(r.train_loss, r.valid_loss, r.metrics) for r in rows if r.stage == "frozen"]
              for mode, (rows, _, _) in runs.items()}
    assert frozen["weights"] == frozen["sampler"] != frozen["none"]
    for mode, (_, reads, y) in runs.items():
        unfrozen = reads["unfrozen"]
        share_b = float(unfrozen[y == 1].sum() / unfrozen.sum())
        if mode == "sampler":
            assert share_b > 0.3, share_b  # about half the draws, against 2 of 22 without
        else:
            assert unfrozen.max() == 1 and share_b <= 2 / 16  # a shuffle: each image at most once

    # Without a frozen stage both runs start from the same model and read the same images in
    # the same order: what differs is the weighted loss.
    (rows_w, reads_w, _), (rows_n, reads_n, _) = (_fit(imbalanced, m, freeze_epochs=0)
                                                  for m in ("weights", "none"))
    assert torch.equal(reads_w["unfrozen"], reads_n["unfrozen"])
    assert rows_w[0].train_loss != pytest.approx(rows_n[0].train_loss)
