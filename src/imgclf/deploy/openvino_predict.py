"""Predict with an exported OpenVINO IR (model.xml + model.bin) using numpy, Pillow and openvino.

The IR is converted from the ONNX export (`imgclf export RUN --format openvino`), so it takes the
same uint8 crops and returns the same probabilities; model.json is embedded in the .xml's
rt_info. Decoding, presizing and TTA are `imgclf.deploy.exported`'s, shared with the ONNX
predictor.

    pip install --no-deps imgclf && pip install numpy pillow openvino
    python -m imgclf.deploy.onnx_predict runs/<name>/model/model.xml photo.jpg

This module imports nothing that imports torch.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.deploy.exported import META_KEY, ExportedClassifier, checked_meta
from imgclf.errors import ImgclfError

XML_FILE = "model.xml"


@dataclass
class OpenVinoClassifier(ExportedClassifier):
    """An exported classifier compiled by OpenVINO for the CPU.

    Attributes:
        compiled: The openvino CompiledModel.
        meta: The bundle's model.json.
        path: The .xml file.
    """

    compiled: object
    meta: dict
    path: Path | None = None

    @property
    def weights_file(self) -> Path | None:
        return self.path.with_suffix(".bin") if self.path else None

    def run_crops(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, C] for uint8 crops [N, 3, S, S], in batches."""
        request = self.compiled.create_infer_request()
        output = self.compiled.output("probabilities")
        out = []
        for start in range(0, len(crops), max(1, batch_size)):
            chunk = np.ascontiguousarray(crops[start : start + max(1, batch_size)], dtype=np.uint8)
            request.infer({0: chunk})
            out.append(np.array(request.get_tensor(output).data, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ImgclfError("OpenVINO is not installed: pip install openvino "
                          "(or pip install 'imgclf[export]')") from None
    return ov


def find_xml(path: str | Path) -> Path:
    """The .xml file for a path: the file itself, or model.xml in a bundle folder or run."""
    p = Path(path)
    for cand in (p, p / XML_FILE, p / "model" / XML_FILE):
        if cand.is_file():
            return cand
    raise ImgclfError(f"{p}: no {XML_FILE} found; create it with "
                      f"`imgclf export {p} --format openvino`")


def compile_model(model, threads: int | None = None):
    """Compile an openvino Model for the CPU.

    fp32 models are compiled with fp32 inference precision: OpenVINO's CPU default is bf16 on
    CPUs that have it, which would make the export predict differently from the bundle that
    `export` checked it against. An int8 model keeps its int8 kernels either way.
    """
    ov = _openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(model, "CPU", config)


def load(path: str | Path, threads: int | None = None) -> OpenVinoClassifier:
    """Load an OpenVINO export: a .xml file (its .bin beside it), or a bundle folder or run
    directory holding model.xml.

    Args:
        path: Where the model is.
        threads: Inference threads (default: OpenVINO's choice).

    Raises:
        ImgclfError: No model, not an imgclf export, or OpenVINO cannot load it.
    """
    ov = _openvino()
    xml = find_xml(path)
    if not xml.with_suffix(".bin").is_file():
        raise ImgclfError(f"{xml.with_suffix('.bin')} is missing: an OpenVINO model is the .xml "
                          "and the .bin together; copy both")
    try:
        model = ov.Core().read_model(str(xml))
        raw = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
        compiled = compile_model(model, threads)
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError and its own classes
        raise ImgclfError(f"{xml}: OpenVINO cannot load it ({type(e).__name__}: "
                          f"{str(e)[:200]}): export it again with `imgclf export`") from e
    names = {n for o in compiled.outputs for n in o.get_names()}
    if "probabilities" not in names:
        raise ImgclfError(f"{xml}: not an imgclf export (outputs {sorted(names)}): export it "
                          "with `imgclf export`")
    return OpenVinoClassifier(compiled, checked_meta(raw, xml), xml)


def convert(onnx_bytes: bytes, meta: dict, stem: str = "model") -> tuple[bytes, bytes]:
    """An ONNX export as OpenVINO IR: (.xml bytes, .bin bytes), model.json in the xml's rt_info.

    The weights stay float32 (OpenVINO's save compresses them to fp16 unless told not to), so
    an fp32 IR computes what the ONNX model computes.
    """
    return to_ir(from_onnx(onnx_bytes), meta, stem)


def from_onnx(onnx_bytes: bytes):
    """An ONNX export as an `openvino.Model` (what `imgclf.deploy.quantize` quantizes)."""
    ov = _openvino()
    try:
        return ov.convert_model(io.BytesIO(onnx_bytes))
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError and its own classes
        raise ImgclfError(f"OpenVINO could not convert the ONNX export ({type(e).__name__}: "
                          f"{str(e)[:300]}): try another --opset") from e


def to_ir(model, meta: dict, stem: str = "model") -> tuple[bytes, bytes]:
    """An `openvino.Model` as IR (.xml bytes, .bin bytes), model.json in the xml's rt_info,
    float weights saved as float32 (int8 ones stay int8)."""
    ov = _openvino()
    try:
        model.set_rt_info(json.dumps(meta), [META_KEY])
        with tempfile.TemporaryDirectory(prefix="imgclf-openvino-") as tmp:
            xml = Path(tmp) / f"{stem}.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
            return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    except Exception as e:  # noqa: BLE001 - openvino raises RuntimeError and its own classes
        raise ImgclfError(f"OpenVINO could not save the model ({type(e).__name__}: "
                          f"{str(e)[:300]})") from e


def load_ir(xml_bytes: bytes, bin_bytes: bytes, threads: int | None = None) -> OpenVinoClassifier:
    """An IR held in memory (what `export` checks before writing it), compiled."""
    ov = _openvino()
    model = ov.Core().read_model(xml_bytes, ov.Tensor(np.frombuffer(bin_bytes, np.uint8)))
    meta = json.loads(model.get_rt_info([META_KEY]).astype(str))
    return OpenVinoClassifier(compile_model(model, threads), meta, None)
