"""From-scratch techniques: normalisation stats, mixup/CutMix, label smoothing, TTA, config."""

import numpy as np
import pytest
import torch

from imgclf.augment import MixBatch
from imgclf.config import TrainConfig
from imgclf.data.transforms import image_stats, resized_eval_transform
from imgclf.predict import tta_views


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


def test_label_smoothing_targets():
    mix = MixBatch(num_classes=4, label_smoothing=0.1)
    t = mix.soft_targets(torch.tensor([2]))
    np.testing.assert_allclose(t.numpy(), [[0.025, 0.025, 0.925, 0.025]], atol=1e-6)


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
    assert torch.equal(views[0], x[..., 4:36, 4:36])
    assert torch.equal(views[1], views[0].flip(-1))
    assert len(tta_views(x, 32, 0)) == 1


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
    cfg = TrainConfig(data="x", model="resnet26d", pretrained=False, epochs=7, lr=0.003)
    cfg.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == cfg
