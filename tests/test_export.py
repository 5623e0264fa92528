"""Export: ONNX / TorchScript files that predict what the bundle predicts, and a torch-free predictor."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.deploy import onnx_predict
from imgclf.deploy.bundle import load as load_bundle
from imgclf.errors import ImgclfError
from imgclf.deploy.export import export

TINY = dict(model="test_efficientnet", pretrained=False, size=32, epochs=2, freeze_epochs=0,
            lr=1e-2, batch_size=8, seed=0)


def _validation_paths(run_dir: Path) -> list[str]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return [row["path"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    """A tiny multi-label run: noisy grey images with a coloured band per label, from a CSV."""
    from imgclf import api

    root = tmp_path_factory.mktemp("export-ml")
    colors = {"red": (210, 30, 30), "green": (30, 190, 50), "blue": (30, 50, 210)}
    subsets = [(), ("red",), ("green",), ("blue",), ("red", "green"), ("green", "blue"),
               ("red", "blue"), ("red", "green", "blue")]
    rows = []
    (root / "images").mkdir()
    for i, labels in enumerate(subsets * 4):
        rng = np.random.default_rng(zlib.crc32(f"export-ml/{i}".encode()))
        pixels = np.clip(128 + rng.normal(0, 20, (40, 48, 3)), 0, 255)
        for k, lab in enumerate(colors):
            if lab in labels:
                pixels[k * 13:(k + 1) * 13] = colors[lab]
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"im{i:02d}.png")
        rows.append((f"im{i:02d}.png", " ".join(labels)))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "labels"), *rows])
    run = api.train(root / "images", csv=str(root / "labels.csv"), multi_label=True,
                    out=str(root / "runs"), name="ml", **TINY)
    return run.path


@pytest.fixture(scope="module")
def onnx_single(tiny_run, tmp_path_factory) -> tuple[Path, object]:
    """The tiny single-label run exported to ONNX (dynamic batch), with its export result."""
    out = tmp_path_factory.mktemp("export-single") / "model.onnx"
    result = export(tiny_run.path, format="onnx", out=out)
    return out, result


def test_onnx_parity_single_label(tiny_run, onnx_single):
    path, result = onnx_single
    parity = result.parity
    print(f"\nsingle-label ONNX {parity.summary()}")
    n_valid = len(_validation_paths(tiny_run.path))
    assert parity.ok and parity.images == n_valid > 0
    assert parity.max_abs_diff <= 1e-4 and parity.top1_agree == n_valid
    assert parity.recorded_max_abs_diff is not None and parity.recorded_max_abs_diff <= 1e-4
    # The file on disk (not only the bytes checked before writing) reproduces the bundle.
    clf = onnx_predict.load(path)
    paths = _validation_paths(tiny_run.path)
    got = clf.predict(paths)
    ref = load_bundle(tiny_run.path).predict(paths, tta=0)
    assert got.names == [str(p) for p in ref.paths]
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-4)
    assert [lab for lab in got.labels()] == ref.labels()
    assert clf.classes == ref.classes and not clf.multi_label


@pytest.mark.slow
def test_onnx_parity_multi_label(ml_run, tmp_path):
    result = export(ml_run, format="onnx", out=tmp_path / "ml.onnx")
    parity = result.parity
    print(f"\nmulti-label ONNX {parity.summary()}")
    n_valid = len(_validation_paths(ml_run))
    assert parity.ok and parity.images == n_valid > 0
    assert parity.top1_agree == parity.decisions_agree == n_valid
    clf = onnx_predict.load(tmp_path / "ml.onnx")
    bundle = load_bundle(ml_run)
    assert clf.multi_label and bundle.thresholds is not None
    np.testing.assert_allclose(clf.decision_thresholds(), bundle.decision_thresholds())
    paths = _validation_paths(ml_run)
    got, ref = clf.predict(paths), bundle.predict(paths, tta=0)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-4)
    assert got.labels() == ref.labels()  # the multi-label decision, at the tuned thresholds
    # Probabilities are sigmoid outputs (rows need not sum to one), computed inside the graph.
    assert not np.allclose(got.probs.sum(1), 1.0)


@pytest.mark.slow
def test_onnx_predictor_runs_with_torch_blocked(tiny_run, onnx_single, tmp_path):
    path, _ = onnx_single
    paths = _validation_paths(tiny_run.path)[:4]
    script = (
        "import sys, json\n"
        "for name in ('torch', 'torchvision', 'timm', 'lightning', 'torchmetrics'):\n"
        "    sys.modules[name] = None  # any import of them now raises ImportError\n"
        "from imgclf.deploy import onnx_predict\n"
        f"clf = onnx_predict.load({str(path)!r})\n"
        f"res = clf.predict({paths!r})\n"
        "print(json.dumps({'probs': res.probs.tolist(), 'labels': res.labels()}))\n"
        "code = onnx_predict.main([" f"{str(path)!r}, {paths[0]!r}, '--json'])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') "
        "and sys.modules[m] is not None]\n"
        "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    out = json.loads(lines[0])
    ref = load_bundle(tiny_run.path).predict(paths, tta=0)
    np.testing.assert_allclose(np.array(out["probs"]), ref.probs, atol=1e-4)
    assert out["labels"] == ref.labels()
    assert json.loads(lines[1])["labels"] == ref.labels()[0]


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_predictor_preprocessing_is_the_training_preprocessing(interp):
    from imgclf.data.transforms import presize_image
    from imgclf.deploy.predict import tta_views

    rng = np.random.default_rng(0)
    for w, h in [(40, 30), (30, 41), (33, 33), (9, 12), (250, 97)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = onnx_predict.presize_image(img, 37, interp)
        theirs = presize_image(img, 37, interp)
        assert ours.shape == theirs.shape == (3, 37, 37) and ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), (w, h)
    x = rng.integers(0, 256, (2, 3, 37, 37), dtype=np.uint8)
    for a, b in zip(onnx_predict.tta_views(x, 32, 9), tta_views(torch.from_numpy(x), 32, 9)):
        assert np.array_equal(a, b.numpy())


def test_static_batch_export_predicts_any_number_of_images(tiny_run, onnx_single, tmp_path):
    result = export(tiny_run.path, format="onnx", out=tmp_path / "static.onnx",
                    dynamic_batch=False)
    assert result.parity.ok
    clf = onnx_predict.load(tmp_path / "static.onnx")
    assert clf.session.get_inputs()[0].shape == [1, 3, 32, 32]
    paths = _validation_paths(tiny_run.path)
    got = clf.predict(paths)
    assert len(got.names) == len(paths) > 1
    dynamic = onnx_predict.load(onnx_single[0])
    assert dynamic.session.get_inputs()[0].shape[0] == "batch"
    np.testing.assert_allclose(got.probs, dynamic.predict(paths).probs, atol=1e-6)
    # With the bundle's TTA setting the predictor averages the same views `predict` does.
    ref = load_bundle(tiny_run.path).predict(paths, tta=3)
    np.testing.assert_allclose(dynamic.predict(paths, tta=3).probs, ref.probs, atol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_via_cli_prints_parity(tiny_run, tmp_path):
    out = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, "-m", "imgclf.cli", "export", str(tiny_run.path),
                        "--format", "torchscript", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "top-1 identical" in r.stderr and "-> OK" in r.stderr and out.is_file()
    module = torch.jit.load(str(out))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    probs, logits = module(x)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    bundle = load_bundle(tiny_run.path)
    from imgclf.data.transforms import normalize

    with torch.no_grad():
        ref = torch.softmax(bundle.model(normalize(x, bundle.preprocess.mean,
                                                   bundle.preprocess.std)), -1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=0)


def test_failed_parity_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "never.onnx"
    with pytest.raises(ImgclfError, match="does not reproduce the bundle"):
        export(tiny_run.path, format="onnx", out=out, tolerance=-1.0)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unwritable_output_is_refused_before_the_export(tiny_run, tmp_path):
    # A bundle away from its run has no validation images for the parity check: had the
    # export and its check run first, that would be the error.
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (lone / name).write_bytes((tiny_run.path / "model" / name).read_bytes())
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ImgclfError, match="cannot write .*a-file/model.onnx.*choose another output"):
        export(lone, format="onnx", out=tmp_path / "a-file" / "model.onnx")


def test_export_errors_name_the_fix(tiny_run, tmp_path):
    with pytest.raises(ImgclfError, match="unknown export format"):
        export(tiny_run.path, format="tflite")
    # A bundle copied away from its run has no validation images: the message says what to pass.
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (lone / name).write_bytes((tiny_run.path / "model" / name).read_bytes())
    with pytest.raises(ImgclfError, match="--images"):
        export(lone, format="onnx")
    paths = _validation_paths(tiny_run.path)[:3]
    result = export(lone, format="onnx", images=paths)
    assert result.parity.ok and result.parity.images == 3 and (lone / "model.onnx").is_file()
    with pytest.raises(ImgclfError, match="no model.onnx"):
        onnx_predict.load(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                    reason="the dynamo exporter needs onnxscript (not in the export extra)")
def test_dynamo_exporter_parity(tiny_run, tmp_path):
    result = export(tiny_run.path, format="onnx", exporter="dynamo", out=tmp_path / "d.onnx")
    print(f"\ndynamo ONNX {result.parity.summary()}")
    assert result.parity.ok and result.opset == 18
