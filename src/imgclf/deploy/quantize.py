"""Static int8 quantization of an export with NNCF, calibrated on the run's training images.

`imgclf export RUN --format onnx --int8` quantizes the fp32 ONNX export with NNCF's ONNX backend
(QDQ that onnxruntime runs); `--format openvino --int8` converts the fp32 ONNX export to an
OpenVINO model and quantizes that with NNCF's OpenVINO backend (FakeQuantize). Both use
`nncf.quantize` with the performance preset (symmetric activations), per-channel int8 weights,
full bias correction (`fast_bias_correction=False`), NNCF's overflow fix disabled (8-bit weights
in the first layer too), activation ranges measured on up to 300 of the run's training crops,
decoded and cropped exactly as a deployment does it; for onnxruntime every activation has one
scale (per tensor), for OpenVINO the depthwise inputs keep NNCF's per-channel scales. The
ONNX graph is then rewritten without changing a value it computes, so that onnxruntime runs it
on its integer kernels: signed activations become uint8 with zero point + 128 (onnxruntime ran
int8 x int8 convolutions 2.5x slower than fp32 here, uint8 x int8 ones faster), and each Conv behind
a TF "same" Pad gets its own Quantize/Dequantize pair (onnxruntime fuses only a Conv fed by a
Dequantize; without it the stem and the stride-2 depthwise convolutions ran in float and int8
was no faster than fp32). The uint8 input, the softmax/sigmoid and the probabilities stay float.

Measured on tf_efficientnet_lite0 fine-tuned on caltech101_subset (imgclf defaults, seed 42,
accuracy 0.9337), nncf 3.4, onnxruntime 1.32, OpenVINO 2026.4, 2 shared cores (AVX512-VNNI).
Calibrated on 300 training images; top-1 agreement with fp32 and accuracy on all 1010
validation images (the parity check's); every NNCF row with full bias correction; img/s at
batch 1 / 32 (shared machine, relative only, each row against fp32 in the same run):

| setting | runtime | agreement | accuracy | img/s int8 vs fp32 |
|---|---|---|---|---|
| onnxruntime quantize_static, uint8 activations (before) | onnxruntime | 978 (96.83%) | -0.99 | 64/82 vs 42/52 |
| same, symmetric int8 activations (as uint8 + 128) | onnxruntime | 997 (98.71%) | +0.00 | 37/49 vs 41/47 |
| same, symmetric, QDQ converted to OpenVINO (before) | OpenVINO | 996 (98.61%) | -0.30 | |
| NNCF performance preset | OpenVINO | 997 (98.71%) | -0.20 | |
| NNCF mixed preset | OpenVINO | 995 (98.51%) | -0.40 | |
| NNCF performance, overflow fix off (chosen) | OpenVINO | 1007 (99.70%) | +0.10 | 217/219 vs 66/68 |
| NNCF mixed, overflow fix off | OpenVINO | 1002 (99.21%) | -0.20 | |
| NNCF performance, first conv float instead | OpenVINO | 1003 (99.31%) | +0.10 | |
| NNCF performance, overflow fix off, per-tensor activations | OpenVINO | 1001 (99.11%) | -0.30 | |
| NNCF ONNX QDQ (chosen ONNX setting) read by OpenVINO | OpenVINO | 1002 (99.21%) | -0.30 | 130/191 vs 66/68 |
| NNCF performance preset, NNCF's defaults | onnxruntime | 998 (98.81%) | -0.40 | 35/42 vs 41/47 |
| NNCF mixed preset, NNCF's defaults | onnxruntime | 997 (98.71%) | -0.40 | 32/40 vs 41/47 |
| performance, per-tensor activations, uint8 | onnxruntime | 1002 (99.21%) | -0.20 | 34/45 vs 37/50 |
| + Quantize/Dequantize after each Pad | onnxruntime | 1000 (99.01%) | -0.30 | 57/70 vs 39/53 |
| + overflow fix off (chosen) | onnxruntime | 1003 (99.31%) | -0.10 | 58/70 vs 42/52 |
| + first conv float instead of the overflow fix off | onnxruntime | 1003 (99.31%) | -0.10 | 69/75 vs 42/52 |
| chosen, but mixed preset (asymmetric activations) | onnxruntime | 1000 (99.01%) | -0.30 | |
| chosen, but global min/max ranges (NNCF: mean of min/max) | onnxruntime | 1002 (99.21%) | -0.20 | |

- NNCF's defaults quantize the inputs of depthwise convolutions per channel (onnxruntime's
  QLinearConv takes only one scale, so those ran in float) and leave signed activations int8
  (onnxruntime's slow int8 x int8 path).
- The overflow fix (NNCF's default for the first layer: 7-bit weights, against int16
  saturation on CPUs without VNNI) cost 10 validation labels in OpenVINO, 3 in onnxruntime.
  On a CPU without VNNI, export
  there: the parity check then measures the kernels that will run.
- NNCF 3.4's full bias correction fails on some ONNX graphs (resnet10t's residual blocks:
  "Failed to find node output"); those are quantized with its fast bias correction instead, with
  a warning, and the file records which was used (the OpenVINO backend quantized resnet10t,
  mobilenetv3 and convnext with the full one).
- The Quantize/Dequantize after Pad is exact on the int8 grid, but the fused QLinearConv rounds
  its bias and output differently from the float Conv it replaces: 2 labels of 1010.
- Accuracy control (`nncf.quantize_with_accuracy_control`, reverting the most sensitive layers
  to float) is not used: with top-1 agreement on held-out training images as its metric (300
  neither calibrated on nor validation images) it has nothing to restore, since every NNCF
  variant above agrees on 100% of them (the model is confident on its training images: 1 of
  300 has a top-1 margin under 0.2, against 34 of the 1010 validation images). Their mean
  |logit_int8 - logit_fp32| tracks the validation one (0.341 vs 0.352, performance preset,
  OpenVINO), a usable metric should the plain setting ever fall short.
- Earlier, with onnxruntime's quantizer (not repeated here): layers kept float (stem,
  depthwise, head) did not help, percentile and entropy calibration took 3-4x longer and agreed
  no better than MinMax, 1000 calibration images no better than 300, and QOperator cannot
  quantize tf_efficientnet_lite0 at all ("Graph is not a DAG", from the TF padding subgraph).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from imgclf.data.files import list_images
from imgclf.data.presize import center_view
from imgclf.data.samples import TRAIN
from imgclf.data.sources import load_table
from imgclf.deploy import onnx_predict, openvino_predict
from imgclf.deploy.exported import META_KEY
from imgclf.errors import ImgclfError
from imgclf.rundir import RunDir

log = logging.getLogger(__name__)

# 300: NNCF's default subset, and more did not help with onnxruntime's quantizer (an earlier
# caltech run, OpenVINO int8 on 1010 validation images: 300 images 99.0% agreement, 1000 images
# 98.8%; the difference is 2 images, noise) while it costs calibration time.
CALIBRATION_IMAGES = 300


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


def quantize_onnx(fp32: bytes, crops: np.ndarray) -> bytes:
    """The fp32 ONNX export quantized to int8 by NNCF (QDQ), calibrated on `crops`, laid out
    for onnxruntime's integer kernels.

    Args:
        fp32: The fp32 ONNX export (model.json in its metadata).
        crops: uint8 calibration crops [N, 3, S, S].

    Raises:
        ImgclfError: nncf is missing or fails on the graph.
    """
    nncf = _nncf()
    import onnx

    model = onnx.load_from_string(fp32)
    meta = list(model.metadata_props)
    _cast_outputs_to_identity(model)
    name = model.graph.input[0].name
    proto, bias = _run(nncf, model, crops, lambda x: {name: x}, per_tensor_activations=True)
    # Both rewrites leave every value the graph computes as NNCF made it; they only let
    # onnxruntime pick its fast uint8 x int8 kernels and fuse every convolution.
    _uint8_activations(proto)
    _requantize_after_pad(proto)
    del proto.metadata_props[:]
    for entry in meta:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    proto.metadata_props.add(key="imgclf_quantization",
                             value=json.dumps(settings(len(crops), "onnx", bias)))
    if not any(e.key == META_KEY for e in proto.metadata_props):
        raise ImgclfError("the fp32 export carries no model.json to keep: export it again")
    proto.producer_name = "imgclf"
    return proto.SerializeToString()


def quantize_openvino(fp32: bytes, crops: np.ndarray):
    """The fp32 ONNX export converted to an OpenVINO model and quantized to int8 by NNCF
    (FakeQuantize), calibrated on `crops`: an `openvino.Model` for
    `imgclf.deploy.openvino_predict.to_ir`.

    Raises:
        ImgclfError: nncf or openvino is missing, or either fails on the graph.
    """
    nncf = _nncf()
    model = openvino_predict.from_onnx(fp32)
    quantized, bias = _run(nncf, model, crops, None, per_tensor_activations=False)
    quantized.set_rt_info(json.dumps(settings(len(crops), "openvino", bias)),
                          ["imgclf_quantization"])
    return quantized


def settings(images: int, runtime: str, bias_correction: str = "full") -> dict:
    """What the int8 file records about how it was made."""
    activations = ("uint8 per-tensor (signed ones symmetric, zero point 128)" if runtime == "onnx"
                   else "int8/uint8 symmetric, depthwise inputs per-channel")
    return {"quantizer": "nncf", "preset": "performance", "weights": "int8 per-channel",
            "activations": activations, "bias_correction": bias_correction, "overflow_fix": "disabled",
            "calibration_images": images}


def _nncf():
    try:
        import nncf
    except ImportError as e:
        raise ImgclfError(f"int8 export needs nncf ({e}): pip install nncf "
                          "(or pip install 'imgclf[export]')") from None
    return nncf


def _run(nncf, model, crops: np.ndarray, transform, per_tensor_activations: bool):
    """nncf.quantize with the settings measured above, NNCF's console output kept out of the
    caller's stdout and its log records sent through `logging`: (quantized model, the bias
    correction used, "full" or "fast")."""
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       OverflowFix, QuantizationParameters)

    advanced = AdvancedQuantizationParameters(
        # Full 8-bit weights in the first layer too: NNCF's default (7 bits there, for CPUs
        # without VNNI) cost 10 (OpenVINO) and 3 (onnxruntime) of the 1010 validation labels.
        overflow_fix=OverflowFix.DISABLE,
        # onnxruntime: one scale per activation tensor, the only kind its QLinearConv takes (a
        # per-channel one left 16 depthwise convolutions in float). OpenVINO runs NNCF's
        # per-channel depthwise inputs, which agreed better there (1007 vs 1001 labels).
        activations_quantization_params=QuantizationParameters(per_channel=False)
        if per_tensor_activations else None)
    dataset = nncf.Dataset([crops[i : i + 1] for i in range(len(crops))], transform)
    with _nncf_output_to_logging():
        try:
            try:
                return _quantize(nncf, model, dataset, len(crops), advanced, fast=False), "full"
            except Exception as e:  # noqa: BLE001 - NNCF raises many unrelated classes
                # NNCF 3.4's full bias correction fails on some ONNX graphs (resnet10t: a
                # residual block's output not found); its fast one quantizes them.
                log.warning("NNCF's full bias correction failed on this graph (%s: %s); "
                            "quantizing with its fast bias correction", type(e).__name__,
                            str(e)[:200])
                return _quantize(nncf, model, dataset, len(crops), advanced, fast=True), "fast"
        except Exception as e:  # noqa: BLE001
            raise ImgclfError(f"int8 quantization failed ({type(e).__name__}: {str(e)[:300]}): "
                              "export fp32 (without --int8), or try another --opset") from e


def _quantize(nncf, model, dataset, images: int, advanced, fast: bool):
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=images, fast_bias_correction=fast,
                         advanced_parameters=advanced)


def _cast_outputs_to_identity(model) -> None:
    """A no-op Cast that writes a graph output (the logits' `.float()`) as an Identity: NNCF
    3.4's no-op Cast removal fails on it (KeyError on the output name)."""
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in outputs:
            node.op_type = "Identity"
            del node.attribute[:]


def _uint8_activations(model) -> None:
    """int8 activation Quantize/Dequantize pairs rewritten as uint8, zero point + 128: the same
    values, but onnxruntime runs uint8 x int8 convolutions 2.5x faster than int8 x int8."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    zero_points, outputs = set(), set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue  # weights stay int8
        zero_points.add(node.input[2])
        outputs.add(node.output[0])
        zero_points.update(dq.input[2] for dq in consumers.get(node.output[0], [])
                           if dq.op_type == "DequantizeLinear" and len(dq.input) > 2)
    for name in zero_points:
        zero = numpy_helper.to_array(inits[name])
        if zero.dtype == np.int8:
            shifted = (zero.astype(np.int16) + 128).astype(np.uint8)
            inits[name].CopyFrom(numpy_helper.from_array(shifted, name))
    for info in model.graph.value_info:
        if info.name in outputs and info.type.tensor_type.elem_type == TensorProto.INT8:
            info.type.tensor_type.elem_type = TensorProto.UINT8


def _requantize_after_pad(model) -> None:
    """A Quantize/Dequantize pair (the padded tensor's own scale and zero point) between each
    Dequantize -> Pad (TF "same" padding) and its Conv: onnxruntime fuses only a Conv fed by a
    Dequantize, and padding with 0 stays on the integer grid. Without it the stem and the four
    stride-2 depthwise convolutions of tf_efficientnet_lite0 ran in float."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    pairs = []
    for conv in model.graph.node:
        pad = producer.get(conv.input[0]) if conv.op_type == "Conv" else None
        dq = producer.get(pad.input[0]) if pad is not None and pad.op_type == "Pad" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q_out, dq_out = pad.output[0] + "_imgclf_q", pad.output[0] + "_imgclf_dq"
        pairs.append((conv, [
            onnx.helper.make_node("QuantizeLinear", [pad.output[0], *dq.input[1:]], [q_out],
                                  name=pad.name + "_imgclf_q"),
            onnx.helper.make_node("DequantizeLinear", [q_out, *dq.input[1:]], [dq_out],
                                  name=pad.name + "_imgclf_dq")]))
        conv.input[0] = dq_out
    for conv, nodes in pairs:
        at = list(model.graph.node).index(conv)
        for k, node in enumerate(nodes):
            model.graph.node.insert(at + k, node)


@contextlib.contextmanager
def _nncf_output_to_logging():
    """For the duration of a quantization: NNCF draws rich progress bars on stdout and logs
    through its own stdout handler. The bars are dropped; its records go to the "nncf" logger
    (warnings and up) like any library's, and both are restored afterwards. NNCF also imports
    torch.utils.cpp_extension while it quantizes, which warns "No CUDA runtime is found" on
    every CPU-only machine; that logger is held to errors for the duration too."""
    logger = logging.getLogger("nncf")
    cpp = logging.getLogger("torch.utils.cpp_extension")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    cpp_level = cpp.level
    logger.handlers[:] = []
    logger.setLevel(logging.WARNING)
    logger.propagate = True
    cpp.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        cpp.setLevel(cpp_level)
