"""Nothing imgclf loads can run code: bundles hold no pickle, checkpoints load with
`weights_only=True`, and a planted malicious pickle is refused, never executed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from imgclf import api, cli
from imgclf.deploy import bundle
from imgclf.training import engine, models, preflight
from imgclf.data.transforms import Preprocess
from imgclf.errors import ImgclfError

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"


class Payload:
    """Unpickling this creates `marker`: proof that the loader executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> None:
    """A torch-style checkpoint file whose unpickling would create `marker`."""
    torch.save({"state_dict": Payload(marker), "epoch": 0, "global_step": 3}, path)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point (`imgclf ...`) in this process: exit code and stderr."""
    import sys

    old = sys.argv
    sys.argv = ["imgclf", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    return bundle.save_bundle(tmp_path / "model", model, "test_efficientnet", ["a", "b", "c"],
                              False, pre)


def test_bundle_is_safetensors_and_json(tiny_bundle):
    from safetensors import safe_open

    meta = json.loads((tiny_bundle / "model.json").read_text())
    assert meta["arch"] == "test_efficientnet"
    with safe_open(str(tiny_bundle / "weights.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) > 10
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["model.json", "weights.safetensors"]


@pytest.mark.parametrize("target", ["weights.safetensors", "model.json"])
def test_pickle_planted_in_a_bundle_is_refused(tiny_bundle, tmp_path, capsys, target):
    marker = tmp_path / "executed"
    plant(tiny_bundle / target, marker)
    with pytest.raises(ImgclfError, match=re.escape(target)):
        bundle.load(tiny_bundle)
    code, err = run_cli(["predict", tiny_bundle, tiny_bundle / "model.json"], capsys)
    assert code == 2 and target in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_pickle_planted_in_a_checkpoint_is_refused_on_resume(tmp_path, color_data, monkeypatch,
                                                           capsys):
    """Lightning's resume path goes through AtomicCheckpointIO, which refuses the payload."""
    save = engine.AtomicCheckpointIO.save_checkpoint

    class Stop(BaseException):
        pass

    def save_then_stop(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        raise Stop  # the run dies right after its first checkpoint

    with monkeypatch.context() as m, pytest.raises(Stop):
        m.setattr(engine.AtomicCheckpointIO, "save_checkpoint", save_then_stop)
        api.train(color_data, out=str(tmp_path), name="run", model="test_efficientnet",
                  pretrained=False, size=32, epochs=1, freeze_epochs=0, batch_size=8,
                  checkpoint_every=1, precision="32", lr=0.01)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert engine.AtomicCheckpointIO().load_checkpoint(ckpt)["global_step"] == 1

    marker = tmp_path / "executed"
    plant(ckpt, marker)
    with pytest.raises(ImgclfError, match="refused to load: it holds pickled code"):
        api.train(resume=run)
    code, err = run_cli(["train", "--resume", run], capsys)
    assert code == 2 and "last.ckpt" in err and "Traceback" not in err
    assert not marker.exists()


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ImgclfError, match="damaged checkpoint"):
        engine.AtomicCheckpointIO().load_checkpoint(bad)


def test_pickled_weights_file_is_refused_before_timm_sees_it(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "weights.pth"
    plant(evil, marker)
    problems = preflight.weights_problems(evil, "test_efficientnet", 3)
    assert len(problems) == 1 and "pickled objects other than tensors" in problems[0]
    assert not marker.exists()


def test_every_torch_load_in_imgclf_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
        assert "pickle.load(" not in text and "allow_pickle=True" not in text, path.name
    assert calls, "the scan found no torch.load call at all"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"
