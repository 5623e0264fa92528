"""The recipe's pieces: LR rule, feature cache, view sampler, and a whole tiny training run."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from conftest import TINY

from imgclf import models, training
from imgclf.data.cache import decode_all
from imgclf.data.datasets import ImageDataset
from imgclf.data.transforms import Preprocess, eval_transform, normalize


def test_valley_picks_the_steep_descent_not_the_minimum():
    lrs = np.logspace(-6, 0, 100)
    # Flat, then a long descent from 1e-4 to 1e-1, then an explosion.
    losses = np.where(lrs < 1e-4, 2.0, 2.0 - 1.5 * np.log10(lrs / 1e-4) / 3)
    losses = np.where(lrs > 1e-1, 0.5 + 20 * (lrs - 1e-1), losses)
    lr = training.valley_lr(lrs, losses)
    assert 1e-4 < lr < 1e-2


def test_view_sampler_cycles_views_and_repeats_passes():
    s = training.ViewSampler(n=5, views=2, seed=0, passes=3)
    s.set_epoch(0)
    first = list(s)
    assert len(first) == 15 and sorted(set(first)) == [0, 1, 2, 3, 4]
    s.set_epoch(1)
    assert sorted(set(s)) == [5, 6, 7, 8, 9]
    s.set_epoch(0)
    assert list(s) == first


def test_head_passes_gives_enough_steps():
    assert training.head_passes(86, 32, 60) == 30
    assert training.head_passes(10_000, 32, 60) == 1


def test_cached_features_equal_frozen_body_output(color_data):
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    paths = sorted(color_data.rglob("*.jpg"))[:10]
    images, errors, _ = decode_all(paths, pre, None, progress=False)
    assert not errors
    ds = ImageDataset(images, range(len(paths)), torch.zeros(len(paths), dtype=torch.long),
                      eval_transform(pre.size))
    loader = DataLoader(ds, batch_size=4)
    feats, _ = training.extract_features(model, loader, pre, "32-true", torch.device("cpu"))
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        direct = models.pre_logits(model.eval(), normalize(x, pre.mean, pre.std))
    assert torch.allclose(feats, direct, atol=1e-5)


def test_tiny_run_writes_the_run_directory(tiny_run):
    d = tiny_run.path
    for name in ["config.yaml", "metrics.csv", "metrics.json", "predictions.csv",
                 "data_summary.json", "model/weights.safetensors", "model/model.json",
                 "plots/curves.png", "plots/confusion.png"]:
        assert (d / name).is_file(), name
    m = json.loads((d / "metrics.json").read_text())
    for key in ["valid_accuracy", "valid_loss", "train_seconds", "images_per_second", "epochs",
                "model", "valid_balanced_accuracy", "valid_f1_macro"]:
        assert key in m, key
    assert m["epochs"] == TINY["epochs"] and m["model"] == "test_efficientnet"
    rows = tiny_run.history()
    assert [r["stage"] for r in rows] == ["unfrozen"] * TINY["epochs"]
    assert {"epoch", "lr", "train_loss", "valid_loss", "valid_accuracy", "seconds"} <= set(rows[0])


def test_tiny_run_learns_colours(tiny_run):
    assert tiny_run.metrics()["valid_accuracy"] >= 0.8


def test_bundle_round_trip_same_probabilities(tiny_run, tmp_path):
    from imgclf import bundle as bundle_mod

    b = bundle_mod.load(tiny_run.path)
    paths = sorted(p for p in tiny_run.predictions().paths)[:6]
    before = b.predict(paths).probs
    bundle_mod.save_bundle(tmp_path / "copy", b.model, b.arch, b.classes, b.multi_label,
                           b.preprocess)
    after = bundle_mod.load(tmp_path / "copy").predict(paths).probs
    np.testing.assert_array_equal(before, after)


def test_predict_reproduces_validation_probabilities(tiny_run):
    import imgclf

    preds = tiny_run.predictions()
    result = imgclf.load(tiny_run.path / "model").predict(preds.paths)
    assert [str(p) for p in result.paths] == list(preds.paths)
    assert np.abs(result.probs - preds.probs).max() < 1e-4
