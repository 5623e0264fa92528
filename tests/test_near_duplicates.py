"""Near-identical images across splits (perceptual hash), next to the identical-file leakage check."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgclf.data.sources import from_folder
from imgclf.data.validate import NEAR_DUPLICATE_BITS, check_table, hamming_distances, perceptual_hash


def _photo(path, seed: int, size: int = 96, fmt: str = "PNG", **save) -> Image.Image:
    """A smooth random picture (blobs and gradients, like a photo at thumbnail scale)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return img


def test_hash_survives_resizing_and_reencoding_but_not_other_pictures(tmp_path):
    img = _photo(tmp_path / "a.png", seed=1)
    img.resize((61, 61), Image.Resampling.BILINEAR).save(tmp_path / "small.jpg", quality=60)
    img.convert("L").save(tmp_path / "gray.png")
    others = [_photo(tmp_path / f"o{i}.png", seed=100 + i) for i in range(20)]
    h = perceptual_hash(tmp_path / "a.png")
    near = [perceptual_hash(tmp_path / n) for n in ("small.jpg", "gray.png")]
    far = [perceptual_hash(tmp_path / f"o{i}.png") for i in range(len(others))]
    assert hamming_distances([h], near).max() <= NEAR_DUPLICATE_BITS
    assert hamming_distances([h], far).min() > NEAR_DUPLICATE_BITS


def test_blank_images_have_no_hash(tmp_path, make_image):
    assert perceptual_hash(make_image(tmp_path / "white.png", size=(40, 30), color=(255, 255, 255))) is None


def test_hamming_distances_without_numpy_bitwise_count(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 7, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    b = rng.integers(0, 2**63, 5, dtype=np.int64).astype(np.uint64) + np.uint64(1)
    expected = np.array([[bin(int(x) ^ int(y)).count("1") for y in b] for x in a])
    assert (hamming_distances(a, b) == expected).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert (hamming_distances(a, b) == expected).all()


def test_check_reports_near_duplicates_across_splits_only(tmp_path):
    root = tmp_path / "data"
    seed = 0
    for split, n in (("train", 4), ("valid", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                seed += 1
                _photo(root / split / c / f"{c}{i}.png", seed=seed)
    # A shrunk, re-encoded copy of a training picture in validation, labelled differently...
    src = Image.open(root / "train/cat/cat0.png")
    src.resize((70, 70)).save(root / "valid/dog/resaved.jpg", quality=70)
    # ...an exact copy (identical-file leakage, reported there and not again here)...
    (root / "valid/cat/copy.png").write_bytes((root / "train/cat/cat1.png").read_bytes())
    # ...and a near copy within training, which is no leakage.
    src.resize((80, 80)).save(root / "train/cat/again.jpg", quality=80)
    table, report = check_table(from_folder(root))
    assert sorted((d.train, d.other, d.split) for d in report.near_duplicates) == [
        ("train/cat/again.jpg", "valid/dog/resaved.jpg", "valid"),
        ("train/cat/cat0.png", "valid/dog/resaved.jpg", "valid"),
    ]
    assert all(d.labels == [["cat"], ["dog"]] for d in report.near_duplicates)
    distances = [d.distance for d in report.near_duplicates]
    assert distances == sorted(distances)  # closest first
    assert len(report.leakage) == 1
    line = next(x for x in report.lines() if "nearly identical" in x)
    assert line.startswith("LEAKAGE: 1 validation/test images look nearly identical")
    assert "near_duplicates" in report.to_dict()


@pytest.mark.slow
@pytest.mark.integration
def test_no_near_duplicates_between_imagenette_train_and_val():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2_224_subset"
    if not root.is_dir():
        pytest.skip("shared data not available")
    _, report = check_table(from_folder(root))
    assert report.near_duplicates == []
