"""Presizing and views: the preprocessing that training, evaluation and predict share."""

import numpy as np
import torch
from PIL import Image

from imgclf.data.transforms import (Preprocess, center_crop, normalize, presize_for,
                                    presize_image, train_transform)


def test_presize_square_crop_of_short_side():
    img = Image.new("RGB", (200, 100), (10, 20, 30))
    arr = presize_image(img, 64)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.uint8
    assert (arr[:, 32, 32] == [10, 20, 30]).all()


def test_presize_keeps_the_center():
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 100:200] = 255  # a white middle third: exactly the square the crop keeps
    arr = presize_image(Image.fromarray(pixels), 50)
    assert arr.mean() > 250


def test_presize_for_matches_crop_pct():
    assert presize_for(224, 0.875) == 256
    assert presize_for(32, 1.0) == 32


def test_preprocess_from_timm_cfg_and_round_trip():
    cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    pre = Preprocess.from_model_cfg(cfg)
    assert (pre.size, pre.presize, pre.mean) == (224, 256, (0.5, 0.5, 0.5))
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_model_cfg(cfg, size=128).size == 128


def test_center_crop_and_normalize():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    c = center_crop(x, 4)
    assert c.shape == (2, 3, 4, 4) and torch.equal(c, x[..., 2:6, 2:6])
    y = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(y, torch.ones_like(y))


def test_train_transform_output_size_and_dtype():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    y = train_transform(32)(x)
    assert y.shape == (3, 32, 32) and y.dtype == torch.uint8
