"""The decode cache is keyed by content: an edited file is decoded again, and training through
the cache (cold or warm) gives the predictions training without it gives."""

import os
import time
from pathlib import Path

import pytest
import numpy as np
from conftest import TINY, make_image

from imgclf.data.cache import decode_all, entry_folder
from imgclf.data.transforms import Preprocess

PRE = Preprocess(size=32, presize=36)


def entries(cache: Path) -> set[Path]:
    return set(entry_folder(cache, PRE).rglob("*.npy"))


def test_changed_image_file_invalidates_its_entry(tmp_path, monkeypatch):
    from imgclf.data import cache as cache_mod

    decoded = []
    decode = cache_mod.open_rgb_with_info
    monkeypatch.setattr(cache_mod, "open_rgb_with_info",
                        lambda data, *a, name=None, **kw: decoded.append(name) or decode(
                            data, *a, name=name, **kw))
    cache = tmp_path / "cache"
    photo = tmp_path / "photo.png"
    make_image(photo, size=(48, 48), color=(200, 30, 30))
    os.utime(photo, (time.time() - 60, time.time() - 60))  # not "racy": the index records it
    first, errors, _ = decode_all([photo], PRE, cache, progress=False)
    assert not errors and len(entries(cache)) == 1
    again, _, infos = decode_all([photo], PRE, cache, progress=False)
    assert again.digests == first.digests and decoded == [photo]  # a hit: not decoded again

    make_image(photo, size=(48, 48), color=(30, 30, 200))  # same name and size, new pixels
    edited, _, infos = decode_all([photo], PRE, cache, progress=False)
    assert edited.digests != first.digests and decoded == [photo, photo]  # decoded anew
    assert len(entries(cache)) == 2
    fresh, _, _ = decode_all([photo], PRE, None, progress=False)
    np.testing.assert_array_equal(edited.get(0), fresh.get(0))
    assert edited.get(0)[2].mean() > edited.get(0)[0].mean()  # blue now, not the cached red


@pytest.mark.slow
def test_runs_with_and_without_the_decode_cache_predict_alike(tmp_path, color_data):
    from imgclf import api

    opts = {**TINY, "seed": 3, "deterministic": True, "precision": "32", "out": str(tmp_path)}
    cache = str(tmp_path / "cache")
    runs = [api.train(color_data, name="no-cache", cache_dir="", **opts),
            api.train(color_data, name="cold", cache_dir=cache, **opts),
            api.train(color_data, name="warm", cache_dir=cache, **opts)]
    preds = [r.predictions() for r in runs]
    for p in preds[1:]:
        assert p.paths == preds[0].paths
        np.testing.assert_allclose(p.probs, preds[0].probs, atol=1e-5)
