"""Shared fixtures that generate small images and data sets on disk (tests never need real data)."""

from __future__ import annotations

import csv
import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
            ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM"}


def make_image(
    path: str | Path,
    size: tuple[int, int] = (16, 16),
    color: int | tuple[int, ...] | None = None,
    mode: str = "RGB",
    fmt: str | None = None,
    **save_options,
) -> Path:
    """Write a small image and return its path (parent folders are created).

    Args:
        path: Where to write; the extension picks the format unless `fmt` is given.
        size: (width, height).
        color: A solid colour in `mode`'s terms. None draws noise seeded by the file name, so that
            every generated file has different content (identical files count as duplicates).
        mode: Pillow colour mode of the saved image.
        fmt: Pillow format name ("JPEG", "PNG", ...), overriding the extension.
        **save_options: Passed to `Image.save` (e.g. exif=..., transparency=...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        seed = int.from_bytes(hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).digest()[:4], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert(mode)
    else:
        img = Image.new(mode, size, color)
    img.save(path, format=fmt or _FORMATS.get(path.suffix.lower(), "PNG"), **save_options)
    return path


def make_dataset(
    root: str | Path, counts: dict[str, int], ext: str = ".jpg", size: tuple[int, int] = (16, 16)
) -> Path:
    """Fill `root` with generated images and return it.

    Args:
        root: The data folder.
        counts: Folder (relative to root, e.g. "cat" or "train/cat") to number of images.
        ext: File extension, which picks the format.
        size: (width, height) of every image.
    """
    root = Path(root)
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(root / folder / f"{Path(folder).name}_{i}{ext}", size)
    return root


@pytest.fixture(name="make_image")
def make_image_fixture() -> Callable[..., Path]:
    """The `make_image` helper: make_image(path, size, color, mode, fmt, **save_options)."""
    return make_image


@pytest.fixture(name="make_dataset")
def make_dataset_fixture() -> Callable[..., Path]:
    """The `make_dataset` helper: make_dataset(root, {"cat": 5, "train/dog": 3}, ext, size)."""
    return make_dataset


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A class-folder data set without split folders: 3 classes of 6, 5 and 4 JPEGs of 16x16."""
    return make_dataset(tmp_path / "data", {"cat": 6, "dog": 5, "bird": 4})


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test uses a private decode cache, never the user's ~/.cache/imgclf."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))


COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_color_dataset(root: str | Path, per_class: int = 12, size: int = 40,
                       classes: tuple[str, ...] = ("red", "green", "blue")) -> Path:
    """Class folders of noisy solid-colour JPEGs that even a tiny random-init model can learn."""
    root = Path(root)
    for name in classes:
        base = np.array(COLORS.get(name, (128, 128, 128)), dtype=float)
        for i in range(per_class):
            rng = np.random.default_rng(zlib.crc32(f"{name}/{i}".encode()))
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{name}_{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=92)
    return root


TINY = dict(model="test_efficientnet", pretrained=False, size=32, epochs=4, freeze_epochs=0,
            lr=1e-2, batch_size=8, ema=0)
"""Training options for fast tests: a 100k-parameter random-init model at 32 px. Without the
weight average: over 20 steps from random init it trails the weights (valid accuracy 0.667
against 0.833 on the 6 validation images); tests/test_finetune_stability.py tests it."""


@pytest.fixture(scope="session")
def color_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_color_dataset(tmp_path_factory.mktemp("colors") / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, color_data: Path):
    """One trained tiny run shared by the tests that only read its outputs."""
    import os

    from imgclf import api

    old = os.environ.get("IMGCLF_CACHE_DIR")
    os.environ["IMGCLF_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "imgclf-cache")
    try:
        return api.train(color_data, out=str(tmp_path_factory.mktemp("runs")), name="tiny",
                         seed=0, **TINY)
    finally:
        if old is None:
            os.environ.pop("IMGCLF_CACHE_DIR", None)
        else:
            os.environ["IMGCLF_CACHE_DIR"] = old


# Fixtures that train a model (once per session or module): every test that uses one trains,
# so it is `slow` whether or not it is the one that pays for the training.
TRAINING_FIXTURES = {"tiny_run", "trained", "cli_run", "tiny_cv", "ml_run", "onnx_single",
                     "multi_run", "single_run", "tech_run", "server", "setup",
                     "confident_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def read_csv_rows(path: Path) -> list[dict]:
    """A CSV file (metrics.csv, predictions.csv) as a list of row dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def gn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in "pretrained" weights of test_efficientnet_gn (GroupNorm: ranks of a multi-process
    run normalise alike), so a run has a frozen stage and an LR finder."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet_gn", num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet_gn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
