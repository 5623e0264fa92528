"""From-scratch techniques: normalisation stats, mixup/CutMix, label smoothing, TTA, config."""

import numpy as np
import pytest
import torch

from imgclf.training.augment import MixBatch
from imgclf.config import TrainConfig
from imgclf.data.transforms import image_stats, resized_eval_transform
from imgclf.errors import ImgclfError
from imgclf.data.presize import zoom_center
from imgclf.deploy.predict import tta_views
from imgclf.training.task import Task
from conftest import TINY
from imgclf.training.recipe import (IMAGENET_MEAN, IMAGENET_STD, SizeStage, check_techniques,
                           parse_ints, parse_norm_stats, resolve_norm_stats, size_schedule)


def test_image_stats_on_known_images():
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(20):
        a = np.empty((3, 16, 16), np.uint8)
        a[0], a[1] = 51, 204                      # constant channels: 0.2 and 0.8, std 0
        a[2] = rng.choice([0, 255], size=(16, 16))  # half black, half white: mean 0.5, std 0.5
        imgs.append(a)
    mean, std = image_stats(imgs)
    assert mean[0] == pytest.approx(0.2) and mean[1] == pytest.approx(0.8)
    assert mean[2] == pytest.approx(0.5, abs=0.03) and std[2] == pytest.approx(0.5, abs=0.01)
    assert std[0] == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_single_label_targets_sum_to_one(mixup, cutmix):
    mix = MixBatch(num_classes=5, mixup=mixup, cutmix=cutmix, seed=1)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 5
    for _ in range(5):
        xm, t = mix(x, y)
        assert xm.shape == x.shape and t.shape == (8, 5)
        assert torch.allclose(t.sum(1), torch.ones(8))
        assert (t >= 0).all()


def test_mixed_multi_label_targets_stay_in_unit_interval():
    mix = MixBatch(num_classes=4, multi_label=True, mixup=0.4, cutmix=1.0, seed=2)
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float)
    x = torch.zeros(4, 3, 8, 8)
    for _ in range(10):
        _, t = mix(x, y)
        assert ((t >= 0) & (t <= 1)).all()


def test_mixup_mixes_pixels_and_labels_consistently():
    mix = MixBatch(num_classes=2, mixup=1.0, seed=0)
    x = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 100.0)])
    xm, t = mix(x, torch.tensor([0, 1]))
    # Pixel value / 100 is the weight of image 1, which must equal its label weight.
    np.testing.assert_allclose(xm[:, 0, 0, 0].numpy() / 100, t[:, 1].numpy(), atol=1e-5)


def test_soft_targets_are_one_hot_rows():
    t = MixBatch(num_classes=4).soft_targets(torch.tensor([2]))
    np.testing.assert_array_equal(t.numpy(), [[0, 0, 1, 0]])


def test_mixing_switches_off():
    mix = MixBatch(num_classes=3, mixup=0.4, off_epoch=2)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mix.epoch = 2
    xm, ym = mix(x, y)
    assert xm is x and ym is y


def test_tta_views_shapes_and_first_is_plain():
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    views = tta_views(x, 32, 4)
    assert len(views) == 5 and all(v.shape == (2, 3, 32, 32) for v in views)
    assert all(v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x[..., 4:36, 4:36])
    assert torch.equal(views[1], views[0].flip(-1))
    assert torch.equal(views[2], torch.from_numpy(zoom_center(x.numpy(), 32)))
    assert torch.equal(views[3], views[2].flip(-1))
    assert torch.equal(views[4], x[..., :32, :32])
    assert len(tta_views(x, 32, 0)) == 1 and len(tta_views(x, 32, 20)) == 12


def test_zoom_view_magnifies_the_center():
    # A horizontal ramp: zooming by 1/0.875 makes it steeper by as much, about the same centre.
    ramp = np.tile(np.arange(40, dtype=np.float32) * 6, (1, 3, 40, 1)).astype(np.uint8)
    plain = ramp[..., 4:36, 4:36].astype(float)
    zoom = zoom_center(ramp, 32).astype(float)
    assert zoom.shape == (1, 3, 32, 32) and zoom.dtype == float
    inner = slice(2, 30)  # away from the clamped border pixels
    slope = np.diff(zoom[0, 0, 0, inner]).mean()
    assert slope == pytest.approx(np.diff(plain[0, 0, 0]).mean() * 28 / 32, rel=0.03)
    assert zoom[0, 0, 0, 15:17].mean() == pytest.approx(plain[0, 0, 0, 15:17].mean(), abs=4)
    # A zoom of the whole view is the view itself.
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 37, 37), dtype=np.uint8)
    assert np.array_equal(zoom_center(x, 32, fraction=1.0), x[..., 2:34, 2:34])


def test_continued_stage_schedule_is_one_one_cycle_across_stages():
    """Stage fits with cycle=(first epoch, total epochs) walk one one-cycle between them."""
    from imgclf.training.schedule import cycle_window, one_cycle

    per_epoch, stage_epochs = 5, [2, 1, 3]

    def rates(cycle, epochs):
        start, total = cycle_window(per_epoch * epochs, epochs, cycle)
        return [one_cycle(start + step, total, 1e-2, 0.25) for step in range(per_epoch * epochs)]

    staged = []
    for k, e in enumerate(stage_epochs):
        staged += rates((sum(stage_epochs[:k]), sum(stage_epochs)), e)
    whole = rates(None, sum(stage_epochs))
    np.testing.assert_allclose(staged, whole, rtol=1e-6)
    lrs = [lr for lr, _ in whole]
    assert max(lrs) == pytest.approx(1e-2, rel=0.01) and lrs[-1] < 1e-5


def test_tta_reductions(tiny_run):
    import imgclf

    b = imgclf.load(tiny_run.path)
    paths = tiny_run.predictions().paths[:4]
    plain = b.predict(paths, tta=0).probs
    mean = b.predict(paths, tta=3).probs
    assert mean.shape == plain.shape and np.allclose(mean.sum(1), 1, atol=1e-5)
    b.tta = {"n": 3, "reduce": "max"}
    mx = b.predict(paths).probs
    assert np.allclose(mx.sum(1), 1, atol=1e-5) and not np.allclose(mx, mean)


def test_resized_eval_transform_keeps_field_of_view():
    x = torch.zeros(3, 64, 64, dtype=torch.uint8)
    x[:, 28:36, 28:36] = 255  # a bright center square
    small = resized_eval_transform(28, 64, 0.875)(x)
    assert small.shape == (3, 28, 28) and small[:, 14, 14].min() > 100


def test_config_round_trip(tmp_path):
    cfg = TrainConfig(data="x", model="resnet26d", pretrained=False, epochs=7, lr=0.003,
                      sizes=[128, 192, 224], stage_epochs=[3, 2, 2], mixup=0.4, cutmix=1.0,
                      mixup_off_epoch=5, label_smoothing=0.1, norm_stats="0.5,0.25", tta=4,
                      tta_reduce="max")
    cfg.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == cfg


def test_size_schedule_splits_epochs_and_checks_its_input():
    assert size_schedule([128, 192, 224], 10) == [
        SizeStage(128, 4), SizeStage(192, 3), SizeStage(224, 3)]
    assert size_schedule([128, 224], 5, [1, 4]) == [SizeStage(128, 1), SizeStage(224, 4)]
    assert size_schedule(None, 5, None, final_size=224) == [SizeStage(224, 5)]
    with pytest.raises(ImgclfError, match="largest"):
        size_schedule([224, 128], 4)
    with pytest.raises(ImgclfError, match="one number of epochs per size"):
        size_schedule([128, 224], 4, [1, 2, 3])
    with pytest.raises(ImgclfError, match="at least 3 epochs"):
        size_schedule([96, 128, 224], 2)
    with pytest.raises(ImgclfError, match="at least one epoch"):
        size_schedule([128, 224], 4, [0, 4])
    assert parse_ints("128, 192,224", "--sizes") == [128, 192, 224]
    with pytest.raises(ImgclfError, match="--sizes"):
        parse_ints("128,big", "--sizes")


def test_norm_stats_settings():
    assert parse_norm_stats("auto") == "auto"
    assert parse_norm_stats("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert parse_norm_stats("0.5,0.25") == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert parse_norm_stats("0.1,0.2,0.3,0.4,0.5,0.6") == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    for bad in ("0.5", "a,b", "0.5,0"):
        with pytest.raises(ImgclfError, match="--norm-stats"):
            parse_norm_stats(bad)
    imgs = [np.full((3, 4, 4), 51, np.uint8), np.full((3, 4, 4), 153, np.uint8)]
    mean, std, source = resolve_norm_stats("auto", False, ((0, 0, 0), (1, 1, 1)), imgs)
    assert source == "data" and mean == pytest.approx((0.4,) * 3) and std == pytest.approx((0.2,) * 3)
    assert resolve_norm_stats("auto", True, ((0.1,) * 3, (0.9,) * 3), imgs)[2] == "model"


@pytest.mark.parametrize("change, message", [
    (dict(mixup=-1.0), "--mixup"), (dict(label_smoothing=1.0), "--label-smoothing"),
    (dict(tta=-1), "--tta"), (dict(tta_reduce="median"), "--tta-reduce"),
    (dict(sizes=[128, 224], size=192), "disagree"), (dict(norm_stats="x"), "--norm-stats"),
    (dict(mixup_off_epoch=-2), "--mixup-off-epoch"),
    (dict(stage_schedule="cosine"), "--stage-schedule")])
def test_bad_technique_settings_are_refused(change, message):
    with pytest.raises(ImgclfError, match=message):
        check_techniques(TrainConfig(data="x", **change))


def test_label_smoothing_is_single_label_only():
    with pytest.raises(ImgclfError, match="multi-label"):
        check_techniques(TrainConfig(data="x", label_smoothing=0.1), multi_label=True)


def test_mixing_is_keyed_so_a_resumed_run_mixes_alike():
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 3
    a = MixBatch(num_classes=3, mixup=0.4, cutmix=1.0, seed=5)
    b = MixBatch(num_classes=3, mixup=0.4, cutmix=1.0, seed=5)
    a(x, y, (0, 1))  # b never saw step 1
    xa, ta = a(x, y, (0, 2))
    xb, tb = b(x, y, (0, 2))
    assert torch.equal(xa, xb) and torch.equal(ta, tb)


TECH = dict(model="test_efficientnet", pretrained=False, freeze_epochs=1, lr=1e-2, batch_size=8,
            seed=0, sizes=[24, 32], epochs=3, mixup=0.4, cutmix=1.0, mixup_off_epoch=2,
            label_smoothing=0.1, tta=2)


@pytest.fixture(scope="module")
def tech_run(tmp_path_factory, color_data):
    from imgclf import api

    return api.train(color_data, out=str(tmp_path_factory.mktemp("tech")), name="tech", **TECH)


def test_from_scratch_run_with_every_technique(tech_run, color_data):
    import csv
    import json

    import imgclf
    from imgclf.data.cache import decode_all

    with open(tech_run.path / "metrics.csv", newline="") as f:
        stages = [r["stage"] for r in csv.DictReader(f)]
    # Random init has no frozen stage; 3 epochs over 2 sizes: 2 small, 1 at the final size.
    assert stages == ["unfrozen-24px", "unfrozen-24px", "unfrozen-32px"]
    m = json.loads((tech_run.path / "metrics.json").read_text())
    assert m["best_stage"] == "unfrozen-32px"
    assert m["tta"] == {"views": 3, "reduce": "mean"}
    assert "accuracy" in m["valid_without_tta"]
    b = imgclf.load(tech_run.path)
    assert b.tta == {"n": 2, "reduce": "mean"} and b.preprocess.size == 32
    # Norm stats come from the training images when there are no pretrained weights.
    assert m["normalization"]["source"] == "data"
    assert tuple(b.preprocess.mean) == pytest.approx(tuple(m["normalization"]["mean"]))
    files = sorted(p for p in color_data.rglob("*.jpg"))
    decoded, _, _ = decode_all(files, b.preprocess, None)
    mean, _ = image_stats([decoded.get(i) for i in range(len(decoded))])
    assert b.preprocess.mean == pytest.approx(mean, abs=0.03)  # train is 5/6 of all images
    # The bundle (with its TTA) predicts exactly what predictions.csv says validation measured.
    preds = tech_run.predictions()
    again = b.predict(preds.paths).probs
    np.testing.assert_allclose(again, preds.probs, atol=1e-4)
    plain = b.predict(preds.paths, tta=0).probs
    assert not np.allclose(plain, again, atol=1e-6)
    config = TrainConfig.from_yaml(tech_run.path / "config.yaml")
    assert (config.sizes, config.mixup, config.tta, config.size) == ([24, 32], 0.4, 2, 32)


@pytest.mark.slow
def test_evaluate_uses_and_overrides_the_bundles_tta(tech_run):
    from imgclf import api

    r = api.evaluate(tech_run.path, out=tech_run.path / "eval-tta")
    assert r["tta"]["views"] == 3 and r["tta"]["reduce"] == "mean"
    r0 = api.evaluate(tech_run.path, tta=0, out=tech_run.path / "eval-plain")
    assert "tta" not in r0
    rmax = api.evaluate(tech_run.path, tta=4, tta_reduce="max", out=tech_run.path / "eval-max")
    assert rmax["tta"] == {**rmax["tta"], "views": 5, "reduce": "max"}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["continue", "restart"])
def test_progressive_mixup_run_resumes_exactly_across_a_stage_boundary(tmp_path, color_data,
                                                                        schedule):
    """Killed after the small stage, before the final stage's checkpoint: the resumed run
    restarts the final stage from the small stage's weights and ends where the reference did."""
    import json

    from imgclf import api
    from imgclf.training import engine

    opts = {**TECH, "deterministic": True, "precision": "32", "tta": 0, "stage_schedule": schedule,
            "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "runs")}
    ref = api.train(color_data, name="ref", **opts)

    class Killed(BaseException):
        pass

    save = engine.AtomicCheckpointIO.save_checkpoint
    count = {"n": 0}

    def crashing(self, checkpoint, path, storage_options=None):
        count["n"] += 1
        if count["n"] == 3:  # two epoch checkpoints at 24 px, then the first at 32 px
            raise Killed
        save(self, checkpoint, path, storage_options)

    engine.AtomicCheckpointIO.save_checkpoint = crashing
    try:
        with pytest.raises(Killed):
            api.train(color_data, name="killed", **opts)
    finally:
        engine.AtomicCheckpointIO.save_checkpoint = save
    run = tmp_path / "runs" / "killed"
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["stage"] == "unfrozen" and state["size_stage"] == 1
    api.train(resume=run)
    keys = ("valid_accuracy", "valid_loss", "best_epoch", "best_stage")
    a = json.loads((ref.path / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_batch_crop_draws_by_key_and_keeps_whole_images_at_full_scale():
    from imgclf.training.augment import BatchCrop

    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    crop = BatchCrop(12, seed=3)
    a, b = crop(x, (0, 5)), crop(x, (0, 5))
    assert a.shape == (6, 3, 12, 12) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, crop(x, (0, 6)))
    assert 0 <= float(a.min()) and float(a.max()) <= 255
    whole = BatchCrop(20, seed=0, min_scale=1.0, ratio=(1.0, 1.0))(x, (1,))
    for i in range(len(x)):  # full-area square crops are the image itself or its mirror
        xi = x[i].float()
        assert torch.allclose(whole[i], xi, atol=1e-3) or \
            torch.allclose(whole[i], xi.flip(-1), atol=1e-3)


@pytest.mark.slow
def test_training_with_crops_on_the_device(tmp_path, color_data):
    from imgclf import api

    run = api.train(color_data, out=str(tmp_path), name="device-crops", seed=0,
                    augment_on="device", **{**TINY, "epochs": 2})
    assert run.config().augment_on == "device"
    preds = run.predictions()
    np.testing.assert_allclose(run.load().predict(preds.paths).probs, preds.probs, atol=1e-4)
