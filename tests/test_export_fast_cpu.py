"""Fast CPU deployment: int8 ONNX and OpenVINO exports, checked by agreement, accepted by
predict and serve."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.deploy import onnx_predict, openvino_predict
from imgclf.deploy.bundle import load as load_bundle
from imgclf.deploy.exported import load_exported
from imgclf.deploy.export import export
from imgclf.errors import ImgclfError


def _validation_paths(run_dir: Path) -> list[str]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return [row["path"] for row in csv.DictReader(f)]


def _agreement(a, b) -> float:
    return float(np.mean(a.probs.argmax(1) == b.probs.argmax(1)))


def test_int8_onnx_export_agrees_with_the_bundle_and_predict_accepts_it(tiny_run, tmp_path):
    out = tmp_path / "model.int8.onnx"
    result = export(tiny_run.path, format="onnx", int8=True, out=out)
    parity = result.parity
    print(f"\nint8 ONNX {parity.summary()}")
    assert parity.ok and parity.mode == "agreement" and result.int8
    assert parity.accuracy_bundle is not None and parity.accuracy_export is not None
    assert "training images of tiny" in result.calibration
    assert result.files == [out] and out.is_file()
    clf = onnx_predict.load(out)
    ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "Softmax" in ops  # quantized, the activation kept float
    _assert_uint8_activations(out)
    paths = _validation_paths(tiny_run.path)
    got, ref = clf.predict(paths), load_bundle(tiny_run.path).predict(paths, tta=0)
    assert got.names == [str(p) for p in ref.paths] and _agreement(got, ref) >= 0.99
    r = subprocess.run([sys.executable, "-m", "imgclf.cli", "predict", str(out), *paths[:3]],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(paths[0])
    assert lines[0].split("\t")[1].split()[0] == ref.labels()[0][0]


def _assert_uint8_activations(path: Path) -> None:
    """Every QuantizeLinear of the ONNX int8 export quantizes to uint8 (the symmetric int8
    activations that OpenVINO gets run slower than fp32 in onnxruntime), and the file says so."""
    import json

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quants
    for node in quants:
        zero = inits[node.input[2]]
        assert zero.dtype == np.uint8, node.name
    meta = {e.key: e.value for e in model.metadata_props}
    assert json.loads(meta["imgclf_quantization"])["activations"] == "uint8"


def test_failed_int8_parity_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "never.int8.onnx"
    # No export agrees with its bundle on more than every image.
    with pytest.raises(ImgclfError, match="onnx int8 export does not reproduce the bundle.*"
                                          "nothing written"):
        export(tiny_run.path, format="onnx", int8=True, out=out, min_agreement=1.01)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ImgclfError, match="--int8 works with --format onnx or openvino"):
        export(tiny_run.path, format="torchscript", int8=True, out=tmp_path / "x.pt")


def test_int8_calibrates_on_validation_images_when_training_images_are_gone(tiny_run, tmp_path,
                                                                              caplog):
    run = tmp_path / "moved"
    shutil.copytree(tiny_run.path, run, ignore=shutil.ignore_patterns("checkpoints", "plots"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING", logger="imgclf"):
        result = export(run, format="onnx", int8=True)
    assert result.parity.ok and "validation images" in result.calibration
    assert "instead of the training images" in caplog.text
    assert (run / "model" / "model.int8.onnx").is_file()
    # Without a validation set to fall back on, the error says what to pass.
    (run / "predictions.csv").unlink()
    with pytest.raises(ImgclfError, match="--calibration"):
        export(run, format="onnx", int8=True, check=False, out=tmp_path / "x.onnx")


def test_openvino_missing_is_said_clearly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # any import of it raises ImportError
    with pytest.raises(ImgclfError, match="pip install openvino"):
        openvino_predict.load(tmp_path / "model.xml")


@pytest.fixture(scope="module")
def openvino_xml(tiny_run, tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("openvino") / "model.xml"
    result = export(tiny_run.path, format="openvino", out=out)
    print(f"\nOpenVINO fp32 {result.parity.summary()}")
    assert result.parity.ok and result.parity.mode == "exact"
    assert result.files == [out.with_suffix(".bin"), out]
    return out


def test_openvino_export_predicts_what_the_bundle_predicts(tiny_run, openvino_xml):
    clf = load_exported(openvino_xml)
    assert isinstance(clf, openvino_predict.OpenVinoClassifier) and clf.classes
    paths = _validation_paths(tiny_run.path)
    got, ref = clf.predict(paths), load_bundle(tiny_run.path).predict(paths, tta=0)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-4)
    assert got.labels() == ref.labels()
    # The bundle's TTA views, through the shared code.
    np.testing.assert_allclose(clf.predict(paths, tta=2).probs,
                               load_bundle(tiny_run.path).predict(paths, tta=2).probs, atol=1e-4)


def test_openvino_int8_export(tiny_run, tmp_path):
    pytest.importorskip("openvino")
    result = export(tiny_run.path, format="openvino", int8=True, out=tmp_path / "m.int8.xml")
    print(f"\nOpenVINO int8 {result.parity.summary()}")
    assert result.parity.ok and (tmp_path / "m.int8.bin").is_file()


def test_serve_accepts_the_exports(tiny_run, tmp_path, request):
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    int8 = tmp_path / "model.int8.onnx"
    export(tiny_run.path, format="onnx", int8=True, out=int8, check=False)
    path = _validation_paths(tiny_run.path)[0]
    ref = load_bundle(tiny_run.path).predict([path], tta=0)
    models = [int8]
    if importlib.util.find_spec("openvino") is not None:  # else only ONNX is served here
        models.append(request.getfixturevalue("openvino_xml"))
    for model in models:
        with TestClient(create_app(ServeConfig(bundle=str(model)))) as client:
            info = client.get("/model").json()
            assert info["classes"] == ref.classes and info["version"]
            r = client.post("/predict", files=[("file", ("a.jpg", Path(path).read_bytes()))])
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["labels"] == ref.labels()[0]


def test_the_command_line_calibrates_on_as_many_images_as_the_library():
    import inspect

    from imgclf.cli.app import export as export_command
    from imgclf.deploy.quantize import CALIBRATION_IMAGES

    default = inspect.signature(export_command).parameters["calibration_images"].default
    assert default.default == CALIBRATION_IMAGES
