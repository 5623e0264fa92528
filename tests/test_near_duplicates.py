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


def near_hashes(rng, seeds: np.ndarray, n: int, most_flips: int) -> np.ndarray:
    """n copies of random seeds with up to `most_flips` bits flipped (many pairs meet), then n
    unrelated hashes."""
    out = []
    for _ in range(n):
        h = int(seeds[rng.integers(len(seeds))])
        for bit in rng.choice(64, rng.integers(0, most_flips + 1), replace=False):
            h ^= 1 << int(bit)
        out.append(h)
    out += [int(x) for x in rng.integers(0, 2**63, n, dtype=np.int64)]
    return np.array(out, dtype=np.uint64)


def _brute_force(a, b, max_bits):
    d = hamming_distances(a, b)
    return sorted((int(i), int(j), int(d[i, j])) for i, j in zip(*np.nonzero(d <= max_bits)))


@pytest.mark.parametrize("max_bits", [0, 2, 4, 7])
def test_candidate_search_finds_exactly_what_comparing_all_pairs_finds(max_bits):
    from imgclf.data.near_duplicates import near_pairs

    rng = np.random.default_rng(max_bits)
    seeds = rng.integers(0, 2**63, 30, dtype=np.int64).astype(np.uint64)
    a, b = near_hashes(rng, seeds, 300, 8), near_hashes(rng, seeds, 200, 8)
    want = _brute_force(a, b, max_bits)
    i, j, dist = near_pairs(a, b, max_bits, chunk=37)  # chunks of b as well
    assert list(zip(i.tolist(), j.tolist(), dist.tolist())) == want
    assert len(want) > 0


@pytest.mark.parametrize("max_bits", [0, 1, 4, 7])
def test_every_band_count_finds_what_comparing_all_pairs_finds(max_bits):
    from imgclf.data.near_duplicates import choose_bands, near_pairs

    rng = np.random.default_rng(max_bits)
    seeds = rng.integers(0, 2**63, 25, dtype=np.int64).astype(np.uint64)
    a = near_hashes(rng, seeds, 250, max_bits + 2)
    b = near_hashes(rng, seeds, 150, max_bits + 2)
    want = _brute_force(a, b, max_bits)
    assert want
    for bands in range(2 if max_bits else 1, max_bits + 2):
        i, j, dist = near_pairs(a, b, max_bits, chunk=41, bands=bands)
        assert list(zip(i.tolist(), j.tolist(), dist.tolist())) == want, bands
    # Wide bands for large sets, whose exact 13-bit bands would meet as len(a) * len(b).
    assert choose_bands(800, 200) == 5 and choose_bands(80_000, 20_000) == 3


def _tile(path, seed: int, size: int = 160):
    """A machined surface: the same lighting for every tile, a texture of its own."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    light = 90 + 80 * np.sin(x / size * 3) * np.cos(y / size * 2)
    grain = np.repeat(rng.normal(0, 12, (1, size)), size, 0) + rng.normal(0, 6, (size, size))
    img = Image.fromarray(np.clip(light + grain, 0, 255).astype(np.uint8), "L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def test_texture_photos_sharing_a_hash_are_not_called_copies_but_copies_are(tmp_path):
    from imgclf.data.near_duplicates import CONFIRM_CORRELATION, pixel_similarity

    tile = _tile(tmp_path / "a.png", seed=1)
    _tile(tmp_path / "other.png", seed=2)
    tile.resize((120, 120), Image.Resampling.BILINEAR).save(tmp_path / "copy.jpg", quality=80)
    ha, ho = perceptual_hash(tmp_path / "a.png"), perceptual_hash(tmp_path / "other.png")
    assert hamming_distances([ha], [ho])[0, 0] <= NEAR_DUPLICATE_BITS  # the hash cannot tell
    assert pixel_similarity(tmp_path / "a.png", tmp_path / "other.png") < CONFIRM_CORRELATION
    assert pixel_similarity(tmp_path / "a.png", tmp_path / "copy.jpg") >= CONFIRM_CORRELATION


def test_check_confirms_hash_matches_before_calling_them_leakage(tmp_path):
    for i in range(6):
        _tile(tmp_path / "train" / "ok" / f"t{i}.png", seed=i)
        _tile(tmp_path / "valid" / "ok" / f"v{i}.png", seed=100 + i)
        _tile(tmp_path / "train" / "bad" / f"t{i}.png", seed=200 + i)
        _tile(tmp_path / "valid" / "bad" / f"v{i}.png", seed=300 + i)
    _tile(tmp_path / "train" / "ok" / "t0.png", seed=0).resize((100, 100)).save(
        tmp_path / "valid" / "ok" / "copy.jpg", quality=85)
    _, report = check_table(from_folder(tmp_path))
    assert report.near_duplicate_candidates >= 3  # tiles share hashes...
    assert [(d.train, d.other) for d in report.near_duplicates] == [
        ("train/ok/t0.png", "valid/ok/copy.jpg")]  # ...one is a copy
