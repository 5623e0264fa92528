"""Preflight: each problem that would fail a run later is found before training, in one line."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from imgclf import api
from imgclf.data.sources import load_table
from imgclf.training import preflight
from imgclf.config import TrainConfig
from imgclf.data.samples import TRAIN, VALID, Sample, SampleTable
from imgclf.errors import ImgclfError


def table(rows: list[tuple[str, str]], multi_label: bool = False) -> SampleTable:
    samples = [Sample(Path(f"/d/{i}.jpg"), (lab,) if lab else (), split)
               for i, (lab, split) in enumerate(rows)]
    classes = sorted({lab for lab, _ in rows if lab})
    return SampleTable(samples, classes, multi_label, Path("/d"))


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory) -> dict[str, Path]:
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    out = {}
    for arch in ("test_efficientnet", "resnet10t"):
        sd = timm.create_model(arch, pretrained=False).state_dict()
        out[arch] = root / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out[arch]))
    sd = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    torch.save({"state_dict": sd}, root / "nested.pth")
    out["nested"] = root / "nested.pth"
    return out


def test_good_data_has_no_problems():
    t = table([("a", TRAIN), ("a", VALID), ("b", TRAIN), ("b", VALID)])
    assert preflight.data_problems(t) == []


def test_single_class_is_one_line_with_the_fix():
    problems = preflight.data_problems(table([("a", TRAIN), ("a", VALID)]))
    assert len(problems) == 1 and "only one class ('a')" in problems[0]
    assert "add images of another class" in problems[0]


def test_multi_label_with_one_class_is_fine():
    t = table([("a", TRAIN), ("", TRAIN), ("a", VALID), ("", VALID)], multi_label=True)
    assert preflight.data_problems(t) == []


def test_class_without_training_images_and_missing_validation():
    problems = preflight.data_problems(table([("a", TRAIN), ("b", TRAIN), ("c", TRAIN)]))
    assert any("no validation images" in p for p in problems)
    problems = preflight.data_problems(table([("a", TRAIN), ("a", VALID), ("b", VALID)]))
    assert problems == [p for p in problems if "'b'" in p and "no training images" in p]
    assert len(problems) == 1


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "runs"
    f.write_text("x")
    (problem,) = preflight.output_problems(f / "run")
    assert "is a file, not a folder" in problem and "--out" in problem


def test_output_folder_not_yet_existing_is_fine(tmp_path):
    assert preflight.output_problems(tmp_path / "a" / "b" / "c") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (problem,) = preflight.output_problems(ro / "runs")
        assert "cannot write" in problem
    finally:
        ro.chmod(0o755)


def test_disk_room_is_estimated_from_the_model(tmp_path, monkeypatch):
    n = preflight.count_parameters("tf_efficientnet_lite0", 10)
    assert 3_000_000 < n < 4_000_000
    need = preflight.checkpoint_bytes(n)
    assert need > 3 * 4 * n  # weights + AdamW moments, at least
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(need, need, need // 10))
    (problem,) = preflight.disk_problems(tmp_path, n)
    assert "not enough disk space" in problem and "MB" in problem
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(need, 0, need + 1))
    assert preflight.disk_problems(tmp_path, n) == []


def test_weights_that_fit(weights_files):
    assert preflight.weights_problems(weights_files["test_efficientnet"], "test_efficientnet",
                                      3) == []
    assert preflight.weights_problems(weights_files["nested"], "test_efficientnet", 3) == []
    assert preflight.weights_problems(None, "test_efficientnet", 3) == []


def test_weights_of_another_architecture(weights_files):
    (problem,) = preflight.weights_problems(weights_files["resnet10t"], "test_efficientnet", 3)
    assert "does not fit 'test_efficientnet'" in problem and "--model" in problem


def test_weights_missing_or_not_weights(tmp_path):
    (problem,) = preflight.weights_problems(tmp_path / "nope.safetensors", "resnet10t", 3)
    assert "does not exist" in problem
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>not weights</html>")
    (problem,) = preflight.weights_problems(junk, "resnet10t", 3)
    assert "not a valid safetensors file" in problem


def test_require_raises_all_problems_one_line_each():
    with pytest.raises(ImgclfError) as e:
        preflight.require(["first: fix it", "second: fix that"])
    assert str(e.value).splitlines() == ["2 problems before training:", "first: fix it",
                                         "second: fix that"]
    preflight.require([])


def test_train_refuses_before_creating_the_run_folder(color_data, weights_files, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ImgclfError, match="does not fit 'test_efficientnet'"):
        api.train(color_data, out=str(out), model="test_efficientnet",
                  weights=str(weights_files["resnet10t"]), epochs=1)
    assert not out.exists() or not any(out.iterdir())


def test_check_collects_everything(color_data, tmp_path):
    cfg = TrainConfig(data=str(color_data), model="test_efficientnet",
                      weights=str(tmp_path / "missing.safetensors"))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    t = load_table(cfg)
    problems = preflight.check(cfg, t, blocker / "runs")
    assert len(problems) == 2
    assert any("missing.safetensors does not exist" in p for p in problems)
    assert any("is a file, not a folder" in p for p in problems)
