"""The recipe's pieces: feature cache, precision, schedules, and a whole tiny training run."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from conftest import TINY

from imgclf.training import fine_tune, models
from imgclf.data.cache import decode_all
from imgclf.data.datasets import ImageDataset
from imgclf.data.transforms import Preprocess, eval_transform, normalize


@pytest.mark.slow
def test_cached_features_equal_frozen_body_output(color_data):
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    paths = sorted(color_data.rglob("*.jpg"))[:10]
    images, errors, _ = decode_all(paths, pre, None, progress=False)
    assert not errors
    ds = ImageDataset(images, range(len(paths)), torch.zeros(len(paths), dtype=torch.long),
                      eval_transform(pre.size))
    loader = DataLoader(ds, batch_size=4)
    feats, _ = fine_tune.extract_features(model, loader, pre, "32-true", torch.device("cpu"))
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


@pytest.mark.slow
def test_bundle_round_trip_same_probabilities(tiny_run, tmp_path):
    from imgclf.deploy import bundle as bundle_mod

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


def test_quiet_lightning_restores_warning_filters_and_logger_levels():
    import logging
    import warnings

    from imgclf.training.engine import quiet_lightning

    lightning_log = logging.getLogger("lightning.pytorch")
    filters, level = list(warnings.filters), lightning_log.level
    with quiet_lightning():
        assert lightning_log.level == logging.ERROR
        assert len(warnings.filters) > len(filters)
    assert warnings.filters == filters and lightning_log.level == level
