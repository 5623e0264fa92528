"""Memory bounded by a budget, not by N (issue 18): presized squares streamed from the decode
cache and frozen-body features memory-mapped above the budget give exactly what holding them in
memory gives."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import make_image
from torch.utils.data import DataLoader, TensorDataset

from imgclf.data import cache as cache_mod
from imgclf.data.cache import decode_all, default_memory_budget
from imgclf.data.transforms import Preprocess
from imgclf.training.epochs import Best
from imgclf.training.features import extract_features, feature_block
from imgclf.training.frozen_head import ViewSampler, lr_range_test, train_head
from imgclf.training.task import Task

PRE = Preprocess(size=32, presize=36)


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = [make_image(folder / f"img{i}.png", size=(40, 44),
                        color=tuple(int(c) for c in rng.integers(0, 255, 3))) for i in range(n)]
    then = time.time() - 60  # older than the index's racy window
    for p in paths:
        os.utime(p, (then, then))
    return paths


def test_streamed_squares_equal_held_ones_cold_and_warm(tmp_path):
    paths = _images(tmp_path / "img", 6)
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"not an image")
    # A repeated path and an unreadable file: the held array is reordered, not misaligned.
    listed = [paths[0], broken, *paths, paths[2]]
    held, errors, _ = decode_all(listed, PRE, tmp_path / "c1", progress=False)
    assert held.array is not None and broken in errors
    for cache in ("c1", "c2"):  # warm (entries exist) and cold
        streamed, errs, _ = decode_all(listed, PRE, tmp_path / cache, memory_budget=0,
                                       progress=False)
        assert streamed.array is None and set(errs) == set(errors)
        assert streamed.paths == held.paths and streamed.digests == held.digests
        for i in range(len(held)):
            np.testing.assert_array_equal(streamed.get(i), held.get(i))
    warm, _, _ = decode_all(listed, PRE, tmp_path / "c1", progress=False)
    np.testing.assert_array_equal(warm.array, held.array)


def test_the_held_array_is_not_copied_when_every_file_decodes(tmp_path):
    paths = _images(tmp_path / "img", 4)
    decoded, _, _ = decode_all(paths, PRE, tmp_path / "c", progress=False)
    assert decoded.array.base is None  # one allocation, filled in place


def test_memory_budget_default_and_override(monkeypatch):
    monkeypatch.delenv("IMGCLF_MEMORY_BUDGET_GB", raising=False)
    monkeypatch.setattr(cache_mod, "_available_memory", lambda: 8 * 10**9)
    assert default_memory_budget() == 2 * 10**9  # a quarter of what is available
    monkeypatch.setattr(cache_mod, "_available_memory", lambda: 10**12)
    assert default_memory_budget() == cache_mod.MEMORY_BUDGET_BYTES
    monkeypatch.setattr(cache_mod, "_available_memory", lambda: None)
    assert default_memory_budget() == cache_mod.MEMORY_BUDGET_BYTES
    monkeypatch.setenv("IMGCLF_MEMORY_BUDGET_GB", "0.5")
    assert default_memory_budget() == 5 * 10**8


def test_feature_block_is_memory_mapped_above_the_budget(tmp_path):
    held = feature_block(10, 8, budget=10**6)
    mapped = feature_block(10, 8, budget=100, folder=tmp_path)
    assert held.shape == mapped.shape == (10, 8)
    assert _is_mapped(mapped) and not _is_mapped(held)
    assert not any(tmp_path.iterdir())  # the temporary file has no name left to clean up
    mapped[:] = torch.arange(80, dtype=torch.float32).view(10, 8)
    assert float(mapped.sum()) == float(sum(range(80)))


def _is_mapped(t: torch.Tensor) -> bool:
    """Whether the tensor's bytes lie in a file's mapping (an anonymous one has inode 0)."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs Linux's /proc/self/maps")
    at = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= at < hi:
            return rest[3] != "0" and "(deleted)" in line
    return False


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_memory_mapped_features_train_the_same_head_as_held_ones():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    loader = DataLoader(_Images(24), batch_size=5)
    f_mem, y_mem = extract_features(model, loader, PRE, "32-true", torch.device("cpu"), views=2)
    f_map, y_map = extract_features(model, loader, PRE, "32-true", torch.device("cpu"), views=2,
                                    budget=0)
    assert _is_mapped(f_map) and not _is_mapped(f_mem)
    assert f_map.shape == (48, f_mem.shape[1])
    torch.testing.assert_close(f_map, f_mem, rtol=0, atol=0)
    assert torch.equal(y_map, y_mem)
    # Views are stored view after view, as ViewSampler reads them (an eval loader: equal).
    torch.testing.assert_close(f_mem[:24], f_mem[24:], rtol=0, atol=0)

    task = Task(("a", "b", "c"))
    heads = []
    for feats, ys in ((f_mem, y_mem), (f_map, y_map)):
        head = torch.nn.Linear(feats.shape[1], 3)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        lr, _, _ = lr_range_test(head, task, feats, ys, batch_size=8, seed=0, steps=20)
        rows: list = []
        train_head(head, task, TensorDataset(feats, ys), (feats[:24], ys[:24]), epochs=2, lr=lr,
                   sampler=ViewSampler(24, 2, seed=0), batch_size=8, rows=rows, best=Best(),
                   full_model=head, on_row=lambda row, improved: None)
        heads.append((lr, head.state_dict(), head(feats[:24]).detach(), rows))
    (lr_a, state_a, pred_a, rows_a), (lr_b, state_b, pred_b, rows_b) = heads
    assert lr_a == lr_b
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=0, atol=0)
    torch.testing.assert_close(pred_a, pred_b, rtol=0, atol=0)
    assert [r.valid_loss for r in rows_a] == [r.valid_loss for r in rows_b]


@pytest.mark.parametrize("views", [1, 3])
def test_features_keep_the_loader_order(views):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    data = _Images(7)
    feats, ys = extract_features(model, DataLoader(data, batch_size=3), PRE, "32-true",
                                 torch.device("cpu"), views=views, budget=0)
    one, _ = extract_features(model, DataLoader(data, batch_size=7), PRE, "32-true",
                              torch.device("cpu"))
    assert torch.equal(ys, data.y.repeat(views))
    torch.testing.assert_close(feats[:7], one, rtol=1e-5, atol=1e-5)
