"""The decode cache at scale: a size cap with least-recently-used eviction, one decode per file,
and a warm run that opens no image yet reports the same data summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import TINY, make_image

from imgclf.data import cache as cache_mod
from imgclf.data.cache import cache_info, clear_cache, decode_all, entry_folder, evict
from imgclf.data.transforms import Preprocess

PRE = Preprocess(size=32, presize=36)
ENTRY_BYTES = 3 * 36 * 36 + 128  # a .npy of one square: data plus its header


def _backdate(paths) -> None:
    """Files as a data set's are: written a while ago (the index does not trust files modified
    within the last seconds, see file_index.RACY_SECONDS)."""
    then = time.time() - 60
    for p in paths:
        os.utime(p, (then, then))


def _images(folder: Path, n: int) -> list[Path]:
    paths = [make_image(folder / f"img{i}.png", size=(40, 44)) for i in range(n)]
    _backdate(paths)
    return paths


def _held(cache: Path) -> set[str]:
    return {p.stem for p in entry_folder(cache, PRE).rglob("*.npy")}


def test_cap_evicts_least_recently_used_and_rebuilds_bit_identically(tmp_path):
    cache = tmp_path / "cache"
    a, b, c = (_images(tmp_path / name, 4) for name in "abc")
    first_a, _, _ = decode_all(a, PRE, cache, progress=False, max_bytes=10**9)
    first_b, _, _ = decode_all(b, PRE, cache, progress=False, max_bytes=10**9)
    assert _held(cache) == set(first_a.digests) | set(first_b.digests)
    cap = 8 * ENTRY_BYTES + 100  # room for two sets of 4, not three

    # A is used again (touched), so when C arrives it is B, the least recently used, that goes.
    decode_all(a, PRE, cache, progress=False, max_bytes=cap)
    third_c, _, _ = decode_all(c, PRE, cache, progress=False, max_bytes=cap)
    assert _held(cache) == set(first_a.digests) | set(third_c.digests)
    assert cache_info(cache).bytes - cache_info(cache).index_bytes <= cap

    # B's entries are rebuilt, byte for byte what they were.
    again_b, _, _ = decode_all(b, PRE, cache, progress=False, max_bytes=cap)
    np.testing.assert_array_equal(again_b.array, first_b.array)
    assert set(again_b.digests) <= _held(cache)


def test_entries_the_current_call_uses_are_never_evicted(tmp_path, caplog):
    cache = tmp_path / "cache"
    files = _images(tmp_path / "a", 5)
    decoded, _, _ = decode_all(files, PRE, cache, progress=False, max_bytes=1)
    assert _held(cache) == set(decoded.digests)  # over the cap, but all in use
    assert "raise --cache-max-gb" in caplog.text
    assert evict(cache, max_bytes=1) == (5, 5 * ENTRY_BYTES)  # a later call may evict them


def test_streamed_sets_survive_a_small_cap(tmp_path):
    cache = tmp_path / "cache"
    files = _images(tmp_path / "a", 6)
    decoded, _, _ = decode_all(files, PRE, cache, progress=False, memory_budget=1, max_bytes=1)
    assert decoded.array is None
    fresh, _, _ = decode_all(files, PRE, None, progress=False)
    for i in range(len(files)):
        np.testing.assert_array_equal(decoded.get(i), fresh.get(i))


def test_chunked_decoding_lists_the_cache_once_while_under_the_cap(tmp_path, monkeypatch):
    cache, scans = tmp_path / "cache", []
    entries = cache_mod._entries
    monkeypatch.setattr(cache_mod, "_entries", lambda d: scans.append(d) or entries(d))
    files = _images(tmp_path / "a", 6)
    for start in range(0, 6, 2):  # as predict and mining's pool decode: chunk by chunk
        decode_all(files[start:start + 2], PRE, cache, progress=False, max_bytes=10**9)
    assert len(scans) == 1
    decode_all(_images(tmp_path / "b", 2), PRE, cache, progress=False, max_bytes=7 * ENTRY_BYTES)
    assert len(scans) == 2 and len(_held(cache)) == 7  # over the cap: listed, and evicted


def test_cache_info_and_clear(tmp_path):
    cache = tmp_path / "cache"
    decode_all(_images(tmp_path / "a", 3), PRE, cache, progress=False)
    info = cache_info(cache, with_max=True)
    assert info.entries == 3 and info.index_files == 3 and info.max_bytes > 0
    assert [(f.name, f.entries, f.bytes) for f in info.folders] == [
        (entry_folder(cache, PRE).name, 3, 3 * ENTRY_BYTES)]
    assert info.bytes == 3 * ENTRY_BYTES + info.index_bytes
    assert clear_cache(cache).entries == 3
    assert cache_info(cache).entries == 0 and cache_info(cache).index_files == 0


def test_cache_commands(tmp_path):
    from typer.testing import CliRunner

    from imgclf.cli.app import app

    cache = tmp_path / "cache"
    decode_all(_images(tmp_path / "a", 2), PRE, cache, progress=False)
    r = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "36-bicubic" in r.output and "cap:" in r.output
    r = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "2 images" in r.output
    assert not _held(cache)


@pytest.fixture
def counted(monkeypatch):
    """Counts decodes and reads of each file; the separate hashing paths must not run."""
    from imgclf.data import validate

    calls: dict[str, list] = {"decode": [], "read": []}
    decode, read = cache_mod.open_rgb_with_info, cache_mod.read_bytes

    def counting_decode(source, *args, name=None, **kw):
        calls["decode"].append(name)
        return decode(source, *args, name=name, **kw)

    def counting_read(path):
        calls["read"].append(path)
        return read(path)

    def forbidden(*args, **kw):
        raise AssertionError("a file was hashed outside the decode pass")

    monkeypatch.setattr(cache_mod, "open_rgb_with_info", counting_decode)
    monkeypatch.setattr(cache_mod, "read_bytes", counting_read)
    monkeypatch.setattr(validate, "file_digest", forbidden)
    monkeypatch.setattr(validate, "perceptual_hash", forbidden)
    return calls


def _data(root: Path) -> Path:
    for split, n in (("train", 6), ("valid", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                make_image(root / split / c / f"{c}{i}.png", size=(40, 40))
    make_image(root / "train" / "cat" / "grey.png", size=(40, 40), mode="L")
    (root / "train" / "dog" / "copy.png").write_bytes((root / "valid/dog/dog0.png").read_bytes())
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # A smooth picture in training and a shrunk, re-encoded copy of it in validation.
    small = np.random.default_rng(5).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)
    photo.save(root / "train" / "cat" / "photo.png")
    photo.resize((70, 70)).save(root / "valid" / "cat" / "resaved.png")
    _backdate(root.rglob("*.png"))
    return root


def test_each_file_is_decoded_once_cold_and_never_warm(tmp_path, counted):
    from imgclf.commands.train import prepare_data
    from imgclf.config import TrainConfig

    data = _data(tmp_path / "data")
    cfg = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"))
    cold = prepare_data(cfg, PRE)
    files = sorted(data.rglob("*.png"))
    assert sorted(map(Path, counted["decode"])) == files  # each file once, the broken one too
    assert sorted(map(Path, counted["read"])) == files
    assert "1 grayscale" in " ".join(cold.summary.notes)
    assert cold.report.leakage and cold.report.unusable
    assert [(d.train, d.other) for d in cold.report.near_duplicates] == [
        ("train/cat/photo.png", "valid/cat/resaved.png")]  # hashed from the one decode

    counted["decode"].clear()
    counted["read"].clear()
    warm = prepare_data(cfg, PRE)
    # Only the unusable file is tried again; every other answer comes from the index.
    assert [Path(p).name for p in counted["decode"]] == ["broken.png"]
    assert warm.summary.to_dict() == cold.summary.to_dict()
    assert warm.report.to_dict() == cold.report.to_dict()
    np.testing.assert_array_equal(warm.decoded.array, cold.decoded.array)


def test_an_edited_file_is_checked_again(tmp_path, counted):
    cache = tmp_path / "cache"
    files = _images(tmp_path / "a", 3)
    decode_all(files, PRE, cache, progress=False)
    make_image(files[1], size=(40, 44), mode="L")  # new content, size and mtime
    make_image(files[2], size=(40, 44), mode="L")
    _backdate(files[2:])  # an edit that kept the mtime (a copy with -p): the size tells
    counted["decode"].clear()
    _, _, checks = decode_all(files, PRE, cache, progress=False)
    assert sorted(Path(p) for p in counted["decode"]) == files[1:]
    assert checks[files[1]].info.mode == checks[files[2]].info.mode == "L"


@pytest.mark.slow
def test_a_run_after_eviction_predicts_what_the_first_did(tmp_path, color_data):
    from imgclf import api

    opts = {**TINY, "seed": 3, "deterministic": True, "precision": "32", "out": str(tmp_path),
            "cache_dir": str(tmp_path / "cache")}
    first = api.train(color_data, name="first", **opts)
    evict(tmp_path / "cache", max_bytes=1)  # every entry gone
    assert cache_info(tmp_path / "cache").entries == 0
    second = api.train(color_data, name="second", cache_max_gb=1e-9, **opts)
    a, b = first.predictions(), second.predictions()
    assert a.paths == b.paths
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
