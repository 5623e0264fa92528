"""Static int8 quantization of an ONNX export, calibrated on the run's training images.

`imgclf export RUN --format onnx --int8` (and `--format openvino --int8`) runs the fp32 export
through onnxruntime.quantization: shape inference and graph optimisation (`quant_pre_process`),
then `quantize_static` in the QDQ format with per-channel int8 weights and uint8 activations
(symmetric int8 ones for OpenVINO), the activation ranges measured (MinMax) on up to 300 of
the run's training crops, decoded and cropped exactly as a deployment does it. The uint8 input,
the normalisation and the final softmax/sigmoid stay float: quantizing the normalisation would
round every pixel a second time, and probabilities near 0 and 1 are what a uint8 softmax output
loses first.

Settings measured on tf_efficientnet_lite0 fine-tuned on caltech101_subset (imgclf defaults,
seed 42), onnxruntime 1.32 and OpenVINO 2026.4 on 2 shared cores.

- Sensitivity, calibrated on 300 training images and measured on 400 other TRAINING images
  (never the validation images the parity check uses), mean |logit_int8 - logit_fp32| in
  onnxruntime: uint8 asymmetric activations 2.83 (top-1 agreement 99.75%), symmetric int8
  activations 0.35 (100%); symmetric uint8 3.01, reduce_range 3.18 (no help).
- Layers kept float made it worse, not better (with symmetric activations: stem conv float
  0.54, the 16 depthwise convs float 1.47, head conv + classifier float 0.34, no real gain), so
  no layer beyond the input/output steps is kept float.
- Parity check on all 1010 validation images with symmetric activations, calibrated on 300
  training images: OpenVINO 99.0%, -0.30 points (passes, by 0 images: 1000/1010); onnxruntime
  98.7%, +0.20 points (refused). Calibrated on 1000: OpenVINO 98.8%, +0.50 points (refused);
  on 500 validation images onnxruntime 99.0% with 1000 and 98.4% with 300. The margin is a
  handful of near-tied images either way.
- Speed in onnxruntime (img/s at batch 1 / 32, measured under load, relative only): fp32
  203/147, uint8 activations 286/232, symmetric int8 activations 80/84. So the ONNX export keeps
  uint8 activations (fast, but refused on this model: 96.9% agreement, -0.99 points).
- Speed in OpenVINO (same conditions, one process): fp32 289/300, symmetric int8 320/291,
  uint8 int8 321/433. The symmetric activations that make OpenVINO int8 pass cost most of its
  batch-32 gain; OPEN: a setting both accurate and fast (e.g. NNCF with u8 activations and an
  ignored scope) is not found yet.
- MinMax stays the method
  (percentile and entropy took 3-4x longer on the ImageNet head and agreed no better).

QDQ rather than QOperator, measured on this project's CPU (2 cores, AVX512-VNNI) with
onnxruntime 1.32: QOperator cannot quantize tf_efficientnet_lite0 at all (its TF "same" padding
subgraph makes the quantizer's graph cyclic: "Graph is not a DAG"), while QDQ quantizes it in
about 10 s and runs it 1.6-2x faster than fp32 at batch 1 and 32 with the same top-1 labels.
QDQ is also the form OpenVINO's ONNX reader turns into int8 (FakeQuantize), so the same
quantizer serves both runtimes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from imgclf.data.files import list_images
from imgclf.data.presize import center_view
from imgclf.data.samples import TRAIN
from imgclf.data.sources import load_table
from imgclf.deploy import onnx_predict
from imgclf.deploy.exported import META_KEY
from imgclf.errors import ImgclfError
from imgclf.rundir import RunDir

log = logging.getLogger(__name__)

# 300: more did not help (caltech run above, OpenVINO int8 on 1010 validation images: 300 images
# 99.0% agreement, 1000 images 98.8%; the difference is 2 images, noise) and costs time.
CALIBRATION_IMAGES = 300
# Nodes on the way in (uint8 -> float, mean/std) and out (activation) are kept float.
_INPUT_OPS = {"Cast", "Sub", "Div", "Mul", "Add"}
_OUTPUT_OPS = {"Softmax", "Sigmoid"}


def calibration_images(bundle, images=None, limit: int = CALIBRATION_IMAGES,
                       fallback: list[Path] | None = None) -> tuple[list[Path], str]:
    """The images int8 ranges are calibrated on, and a description of them.

    Args:
        bundle: The loaded bundle (its run directory tells where the training data is).
        images: Images to calibrate on instead (files, folders, globs).
        limit: At most this many, spread evenly over the list.
        fallback: Images to use when the training images are gone (the validation images).

    Raises:
        ImgclfError: No image to calibrate on.
    """
    if images:
        files = list_images([str(p) for p in images]).files
        if not files:
            raise ImgclfError("no images found in --calibration: pass folders or files of images")
        return _spread(files, limit), f"{min(len(files), limit)} given images"
    run_dir = bundle.path.parent
    why = f"no run around the bundle ({run_dir / 'config.yaml'} missing)"
    if (run_dir / "config.yaml").is_file():
        try:
            table = load_table(RunDir(run_dir).config())
            files = [s.path for s in table.split(TRAIN) if Path(s.path).is_file()]
            if files:
                return _spread(files, limit), f"{min(len(files), limit)} training images of {run_dir.name}"
            why = "none of its training images exist here"
        except ImgclfError as e:  # the data moved or is gone: DataError, config errors
            why = f"its training images cannot be read ({e})"
    if fallback:
        log.warning("Calibrating int8 on the validation images instead of the training images of "
                    "%s: %s. The parity check then runs on the images the ranges were measured on; "
                    "pass --calibration DIR to calibrate on other images.", run_dir.name, why)
        return _spread(fallback, limit), f"{min(len(fallback), limit)} validation images (training images unavailable)"
    raise ImgclfError(f"{bundle.path}: no images to calibrate int8 on: {why}: pass images with "
                      "--calibration DIR")


def _spread(paths: list[Path], n: int) -> list[Path]:
    if n <= 0 or len(paths) <= n:
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in sorted(set(idx.tolist()))]


def calibration_crops(fp32: bytes, paths: list[Path]) -> np.ndarray:
    """uint8 center crops [N, 3, S, S] of `paths`, decoded and cropped as the ONNX predictor
    does (unreadable files are skipped with a warning)."""
    clf = onnx_predict.load(fp32)
    size = int(clf.preprocess["size"])
    crops, skipped = [], 0
    for p in paths:
        try:
            crops.append(np.ascontiguousarray(center_view(clf.presized(p), size)))
        except ImgclfError:
            skipped += 1
    if skipped:
        log.warning("%d calibration images could not be read and were left out", skipped)
    if not crops:
        raise ImgclfError("none of the calibration images could be read: pass others with "
                          "--calibration DIR")
    return np.stack(crops)


class _Reader:
    """onnxruntime's CalibrationDataReader over crops, `batch` images per call."""

    def __init__(self, crops: np.ndarray, input_name: str, batch: int):
        self.batches = [crops[i : i + batch] for i in range(0, len(crops) - batch + 1, batch)] \
            or [crops[:batch]]
        self.name, self.i = input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def excluded_nodes(model) -> list[str]:
    """Names of the nodes kept float: the input's cast and normalisation up to the first
    layer with weights, and the nodes that produce the probabilities."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out, frontier = [], [model.graph.input[0].name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in _INPUT_OPS and node.name not in out:
                out.append(node.name)
                frontier += list(node.output)
    out += [n.name for n in model.graph.node
            if n.op_type in _OUTPUT_OPS and "probabilities" in n.output]
    return out


def quantize_onnx(fp32: bytes, crops: np.ndarray, static_batch: bool = False,
                  quant_format: str = "qdq", symmetric_activations: bool = False) -> bytes:
    """The fp32 export quantized to int8 (static, per-channel weights), calibrated on `crops`.

    Args:
        fp32: The fp32 ONNX export.
        crops: uint8 calibration crops [N, 3, S, S].
        static_batch: The graph takes one image per call.
        quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs; what OpenVINO reads) or
            "qoperator" (QLinearConv and friends; onnxruntime only).
        symmetric_activations: int8 activations with zero point 0 instead of asymmetric uint8:
            8x less logit error on tf_efficientnet_lite0, but onnxruntime 1.32 runs them 2.5x
            slower than fp32 on this CPU (80 vs 203 img/s at batch 1), so only the OpenVINO
            export asks for them (see the module docstring).

    Raises:
        ImgclfError: onnxruntime.quantization is missing or fails on the graph.
    """
    with _quiet_root_logger():
        return _quantize(fp32, crops, static_batch, quant_format, symmetric_activations)


def _quantize(fp32: bytes, crops: np.ndarray, static_batch: bool, quant_format: str,
              symmetric: bool) -> bytes:
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)
    except ImportError as e:
        raise ImgclfError(f"int8 export needs onnx and onnxruntime ({e}): pip install "
                          "'imgclf[export]'") from None
    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format]
    meta = onnx.load_from_string(fp32).metadata_props
    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        try:
            try:
                quant_pre_process(str(src), str(pre))
            except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            model = onnx.load(str(pre))
            reader = _Reader(crops, model.graph.input[0].name, 1 if static_batch else 16)
            quantize_static(str(pre), str(dst), reader, quant_format=fmt, per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded_nodes(model),
                            # Symmetric int8 activations (zero point 0): 8x less logit error
                            # than asymmetric uint8 on held-out training images (see above).
                            extra_options={"ActivationSymmetric": symmetric},
                            # MinMax: percentile and entropy took 3-4x longer on
                            # tf_efficientnet_lite0 and agreed with fp32 no better (87-92% vs 88%).
                            calibrate_method=CalibrationMethod.MinMax)
        except ImgclfError:
            raise
        except Exception as e:  # noqa: BLE001 - the quantizer raises many unrelated classes
            raise ImgclfError(f"int8 quantization failed ({type(e).__name__}: {str(e)[:300]}): "
                              "export fp32 (without --int8), or try another --opset") from e
        proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    for entry in meta:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    settings = {"format": quant_format, "per_channel": True, "weights": "int8",
                "activations": "int8 symmetric" if symmetric else "uint8", "calibration": "minmax",
                "calibration_images": len(crops)}
    proto.metadata_props.add(key="imgclf_quantization", value=json.dumps(settings))
    if not any(e.key == META_KEY for e in proto.metadata_props):
        raise ImgclfError("the fp32 export carries no model.json to keep: export it again")
    proto.producer_name = "imgclf"
    return proto.SerializeToString()


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_root_logger():
    """For the duration of a quantization: onnxruntime.quantization calls logging.basicConfig
    when imported (a handler on the root logger for the whole process) and warns on the root
    logger about every integer shape tensor it leaves alone. Its warnings are dropped and the
    root logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    handlers, level, quiet = list(root.handlers), root.level, _BelowError()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        root.handlers[:] = handlers
        root.setLevel(level)
