"""Export a bundle to ONNX, OpenVINO or TorchScript, and prove the export predicts what the
bundle predicts.

The exported graph takes uint8 crops [N, 3, S, S] and returns (probabilities, logits): the
normalisation with the bundle's mean/std and the softmax (single-label) or sigmoid (multi-label)
are inside it, so a deployment only has to decode, presize and crop (see `imgclf.deploy.onnx_predict`).
The ONNX file embeds model.json, so it is the whole artifact.

Before anything is written, the export is run on the run's validation images (the paths in
predictions.csv) next to the bundle, and it is only written when every probability matches within
`tolerance` and every top-1 label (and multi-label decision) is identical. An int8 export
(`int8=True`, see `imgclf.deploy.quantize`) cannot match to 1e-4; it is checked by agreement
instead: at least `min_agreement` (99%) of the top-1 labels and decisions the same as the
bundle's, and validation accuracy at most `max_accuracy_drop` (0.5 points) below the bundle's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.data.cache import decode_all
from imgclf.data.files import list_images
from imgclf.data.presize import center_view
from imgclf.deploy import onnx_predict, openvino_predict, quantize
from imgclf.deploy.bundle import Bundle
from imgclf.deploy.bundle import load as load_bundle
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_bytes, check_writable

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "torchscript")
FILENAMES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript.pt"}
INT8_FILENAMES = {"onnx": "model.int8.onnx", "openvino": "model.int8.xml"}
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_TOLERANCE = 1e-4
MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005


class Deployable(nn.Module):
    """uint8 crops in, (probabilities, logits) out: the bundle's model with its pre/post steps.

    The constants are computed exactly as `imgclf.data.transforms.normalize` computes them, so the
    float32 input the network sees is bit-identical to what validation fed it.
    """

    def __init__(self, model: nn.Module, mean, std, multi_label: bool):
        super().__init__()
        self.model = model
        self.multi_label = multi_label
        self.register_buffer("mean255", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std255", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.float() - self.mean255) / self.std255
        logits = self.model(x).float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return probs, logits


@dataclass
class Parity:
    """How closely an export reproduces the bundle on a set of images.

    Attributes:
        images: Images compared.
        source: Where they came from ("validation images of <run>", "given images", ...).
        max_abs_diff: Largest |p_export - p_bundle| over all images and classes.
        mean_abs_diff: Mean of the same differences.
        top1_agree: Images whose most probable class is the same.
        decisions_agree: Images whose decided label set is the same (multi-label thresholds).
        tolerance: The limit on max_abs_diff.
        recorded_max_abs_diff: Largest difference to the probabilities the run recorded at
            validation time (predictions.csv), when those exist for the images.
        mismatched: Images whose top-1 label or decision differs.
        mode: "exact" (every probability within `tolerance`, every label identical) or
            "agreement" (int8: `min_agreement` of the labels identical, accuracy at most
            `max_accuracy_drop` below the bundle's).
        accuracy_bundle: The bundle's accuracy on the images (those with a recorded target).
        accuracy_export: The export's accuracy on the same images.
    """

    images: int
    source: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agree: int
    decisions_agree: int
    tolerance: float
    recorded_max_abs_diff: float | None = None
    mismatched: list[str] = field(default_factory=list)
    mode: str = "exact"
    min_agreement: float = MIN_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    accuracy_bundle: float | None = None
    accuracy_export: float | None = None

    @property
    def ok(self) -> bool:
        if self.images == 0:
            return False
        if self.mode == "agreement":
            agree = min(self.top1_agree, self.decisions_agree) / self.images
            drop = (self.accuracy_bundle - self.accuracy_export
                    if self.accuracy_bundle is not None and self.accuracy_export is not None else 0.0)
            # A better score is no defect; only a drop is limited (1e-9: float rounding).
            return agree >= self.min_agreement and drop <= self.max_accuracy_drop + 1e-9
        return (self.max_abs_diff <= self.tolerance
                and self.top1_agree == self.images and self.decisions_agree == self.images)

    def summary(self) -> str:
        if self.mode == "agreement":
            return self._agreement_summary()
        text = (f"parity on {self.images} {self.source}: max |p_export - p_bundle| = "
                f"{self.max_abs_diff:.2e} (mean {self.mean_abs_diff:.1e}, limit {self.tolerance:g}), "
                f"top-1 identical {self.top1_agree}/{self.images}, decisions identical "
                f"{self.decisions_agree}/{self.images}")
        if self.recorded_max_abs_diff is not None:
            text += f"; vs probabilities recorded at validation: max {self.recorded_max_abs_diff:.2e}"
        return text + (" -> OK" if self.ok else " -> FAILED")

    def _agreement_summary(self) -> str:
        n = self.images
        text = (f"parity on {n} {self.source}: top-1 agreement with the bundle "
                f"{self.top1_agree / max(n, 1):.1%} ({self.top1_agree}/{n}), decisions "
                f"{self.decisions_agree}/{n} (need >= {self.min_agreement:.0%}); ")
        if self.accuracy_bundle is not None and self.accuracy_export is not None:
            text += (f"accuracy {self.accuracy_export:.4f} vs bundle {self.accuracy_bundle:.4f} "
                     f"({100 * (self.accuracy_export - self.accuracy_bundle):+.2f} points, "
                     f"allowed -{100 * self.max_accuracy_drop:.1f})")
        else:
            text += "accuracy not compared (no labels for these images)"
        text += f"; max |p_export - p_bundle| = {self.max_abs_diff:.2e} (mean {self.mean_abs_diff:.1e})"
        return text + (" -> OK" if self.ok else " -> FAILED")

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class ExportResult:
    """What `export` wrote and how it compared to the bundle."""

    path: Path
    format: str
    parity: Parity | None
    opset: int | None
    dynamic_batch: bool
    exporter: str | None
    int8: bool = False
    files: list[Path] = field(default_factory=list)
    calibration: str | None = None


def export(bundle_path: str | Path, format: str = "onnx", out: str | Path | None = None,
           opset: int | None = None, dynamic_batch: bool = True, exporter: str = "torchscript",
           check: bool = True, images: list[str | Path] | None = None, max_images: int = 500,
           tolerance: float = DEFAULT_TOLERANCE, int8: bool = False,
           calibration: list[str | Path] | None = None,
           calibration_images: int = quantize.CALIBRATION_IMAGES,
           min_agreement: float = MIN_AGREEMENT,
           max_accuracy_drop: float = MAX_ACCURACY_DROP) -> ExportResult:
    """Export a bundle to ONNX, OpenVINO or TorchScript after checking it predicts what the
    bundle predicts.

    Args:
        bundle_path: Run directory or bundle folder.
        format: "onnx", "openvino" (IR .xml + .bin, converted from the ONNX export; needs the
            openvino package) or "torchscript".
        out: Output file (default: model.onnx, model.int8.onnx, model.xml, model.int8.xml or
            model.torchscript.pt in the bundle folder); an OpenVINO .bin goes beside the .xml.
        opset: ONNX opset (default: 17 with the TorchScript-based exporter, 18 with dynamo).
        dynamic_batch: Accept any batch size; else the graph is fixed to one image per call.
        exporter: ONNX exporter: "torchscript" (torch.onnx's classic exporter; fast, no extra
            dependency) or "dynamo" (torch.export-based; needs onnxscript).
        check: Run the parity check and refuse to write an export that fails it.
        images: Images for the check (default: the run's validation images).
        max_images: Check at most this many images (evenly spread over the list).
        tolerance: Largest allowed probability difference (fp32 exports).
        int8: Quantize (static int8, calibrated; `imgclf.deploy.quantize`); ONNX and OpenVINO.
        calibration: Images to calibrate int8 on (default: the run's training images).
        calibration_images: Calibrate on at most this many images.
        min_agreement: int8: least fraction of top-1 labels (and decisions) equal to the bundle's.
        max_accuracy_drop: int8: largest accuracy drop against the bundle (0.005 = 0.5 points).

    The parity numbers and the files written are logged.

    Returns:
        The written file, with the parity numbers.

    Raises:
        ImgclfError: Unknown format, a failed export, or a failed parity check (nothing written).
    """
    if format not in FORMATS:
        raise ImgclfError(f"unknown export format '{format}': use one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise ImgclfError(f"unknown ONNX exporter '{exporter}': use one of {', '.join(EXPORTERS)}")
    if int8 and format not in INT8_FILENAMES:
        raise ImgclfError(f"--int8 works with --format onnx or openvino, not {format}")
    bundle = load_bundle(bundle_path)
    out = Path(out) if out else bundle.path / (INT8_FILENAMES if int8 else FILENAMES)[format]
    if format == "openvino" and out.suffix != ".xml":
        raise ImgclfError(f"--out {out}: an OpenVINO model is a .xml file (and a .bin beside "
                          "it): name the output <name>.xml")
    check_writable(out)  # now, not after the export and its parity check
    check_paths = _check_images(bundle, images, max_images) if check else None
    calib = None
    if int8:  # before the export: a missing data folder is said at once
        calib = quantize.calibration_images(
            bundle, calibration, calibration_images,
            fallback=check_paths[0] if check_paths and not images else None)
    wrapper = Deployable(bundle.model, bundle.preprocess.mean, bundle.preprocess.std,
                         bundle.multi_label).eval()
    size = bundle.preprocess.size
    example = torch.zeros(2 if dynamic_batch else 1, 3, size, size, dtype=torch.uint8)
    files: dict[Path, bytes] = {}
    if format in ("onnx", "openvino"):
        opset = opset or (18 if exporter == "dynamo" else 17)
        data = _onnx_bytes(wrapper, example, opset, dynamic_batch, exporter, bundle.meta)
        crops = quantize.calibration_crops(data, calib[0]) if int8 else None
        if format == "onnx":
            if int8:
                data = quantize.quantize_onnx(data, crops)
            files[out] = data
            run_probs = onnx_predict.load(data)
        else:
            # int8: NNCF quantizes the OpenVINO model itself, not a QDQ ONNX converted to it
            # (it places the quantizers where OpenVINO's CPU kernels fuse them).
            model = (quantize.quantize_openvino(data, crops) if int8
                     else openvino_predict.from_onnx(data))
            xml, weights = openvino_predict.to_ir(model, bundle.meta, stem=out.stem)
            files[out.with_suffix(".bin")] = weights  # first: a complete .xml names a complete .bin
            files[out] = xml
            run_probs = openvino_predict.load_ir(xml, weights)
        if int8:
            log.info("Quantized to int8 (NNCF, per-channel weights), calibrated on %s", calib[1])
    else:
        opset, exporter = None, None
        files[out], module = _torchscript_bytes(wrapper, example)
        run_probs = _torchscript_runner(module)
    parity = None
    if check:
        paths, source, recorded, targets = check_paths
        # int8 cannot match to 1e-4, so it is held to agreement and accuracy. fp32 OpenVINO is
        # held to the exact check like fp32 ONNX: it is the same float32 graph (compiled with
        # fp32 precision, see openvino_predict.compile_model), and a 1e-4 limit catches a
        # conversion error that 99% agreement would let through.
        parity = compare(bundle, run_probs, paths, source + (" (int8)" if int8 else ""),
                         recorded, tolerance, onnx=format != "torchscript", targets=targets,
                         mode="agreement" if int8 else "exact", min_agreement=min_agreement,
                         max_accuracy_drop=max_accuracy_drop)
        log.info(parity.summary())
        if not parity.ok:
            what = f"{format}{' int8' if int8 else ''}"
            raise ImgclfError(f"the {what} export does not reproduce the bundle ({parity.summary()});"
                              f" nothing written. Mismatched: {', '.join(parity.mismatched[:5])}")
    for path, data in files.items():
        atomic_write_bytes(path, data)
    log.info("Wrote %s (%.1f MB, %s%s%s%s)", out, sum(map(len, files.values())) / 1e6, format,
             " int8" if int8 else "",
             f", opset {opset}, {exporter} exporter" if format != "torchscript" else "",
             ", dynamic batch" if dynamic_batch else ", batch of 1")
    return ExportResult(out, format, parity, opset, dynamic_batch, exporter, int8,
                        list(files), calib[1] if calib else None)


def _onnx_bytes(wrapper: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool,
                exporter: str, meta: dict) -> bytes:
    import onnx

    names = {"input_names": ["image"], "output_names": ["probabilities", "logits"]}
    with warnings.catch_warnings(), torch.no_grad():
        # torch.onnx announces the classic exporter's deprecation on every call; the choice
        # between the two exporters is documented above and measured in the README.
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset,
                                            dynamic_shapes=shapes, optimize=True, verbose=False,
                                            **names)
                proto = program.model_proto
            else:
                buf = io.BytesIO()
                axes = {"image": {0: "batch"}, "probabilities": {0: "batch"},
                        "logits": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset,
                                  dynamic_axes=axes, do_constant_folding=True, **names)
                proto = onnx.load_from_string(buf.getvalue())
        except ImportError as e:
            raise ImgclfError(f"the {exporter} ONNX exporter needs a missing package ({e}): "
                              "pip install onnxscript, or use --exporter torchscript") from e
        except Exception as e:  # noqa: BLE001 - exporters raise many unrelated classes
            raise ImgclfError(f"ONNX export failed ({type(e).__name__}: {str(e)[:300]}): try the "
                              "other --exporter or another --opset") from e
    proto.producer_name = "imgclf"
    entry = proto.metadata_props.add()
    entry.key, entry.value = "imgclf_model_json", json.dumps(meta)
    return proto.SerializeToString()


def _torchscript_bytes(wrapper: nn.Module, example: torch.Tensor):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what C++
        # (libtorch) and mobile deployments load today.
        module = torch.jit.trace(wrapper, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(module, buf)
    return buf.getvalue(), module


def _torchscript_runner(module):
    @torch.no_grad()
    def run(crops: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(np.ascontiguousarray(crops)))[0].float().numpy()

    return run


def _check_images(bundle: Bundle, images, max_images: int):
    """Images for the parity check and the probabilities recorded for them at validation."""
    if images:
        paths = list_images([str(p) for p in images]).files
        return _spread(paths, max_images), "given images", {}, {}
    pred_csv = bundle.path.parent / "predictions.csv"
    if not pred_csv.is_file():
        raise ImgclfError(f"{bundle.path}: no run around the bundle ({pred_csv} missing) to take "
                          "validation images from: pass images to check with --images")
    recorded, targets = _recorded_probs(pred_csv, bundle.classes)
    paths = [p for p in recorded if p.is_file()]
    if not paths:
        raise ImgclfError(f"none of the validation images listed in {pred_csv} exist here: pass "
                          "images to check with --images")
    return (_spread(paths, max_images), f"validation images of {bundle.path.parent.name}",
            recorded, targets)


def _spread(paths: list[Path], n: int) -> list[Path]:
    if n <= 0 or len(paths) <= n:
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in sorted(set(idx.tolist()))]


def _recorded_probs(pred_csv: Path, classes: list[str]):
    """Probabilities recorded at validation, and the targets (multi-label: space-joined), by path."""
    out, targets = {}, {}
    with open(pred_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                out[Path(row["path"])] = np.array([float(row[f"prob_{c}"]) for c in classes])
            except (KeyError, ValueError):
                continue  # an older or edited file: the recorded comparison is informational
            if row.get("target") is not None:
                targets[Path(row["path"])] = row["target"]
    return out, targets


def compare(bundle: Bundle, export_model, paths: list[Path], source: str,
            recorded: dict[Path, np.ndarray] | None = None,
            tolerance: float = DEFAULT_TOLERANCE, onnx: bool = True,
            targets: dict[Path, str] | None = None, mode: str = "exact",
            min_agreement: float = MIN_AGREEMENT,
            max_accuracy_drop: float = MAX_ACCURACY_DROP) -> Parity:
    """Predict `paths` with the bundle and with an export, and measure the differences.

    Args:
        bundle: The loaded bundle (the reference, run by torch as `imgclf predict` runs it).
        export_model: An `imgclf.deploy.exported.ExportedClassifier` (ONNX or OpenVINO: decodes
            and presizes with its own torch-free code, as a deployment does) or a crops ->
            probabilities function.
        paths: Image files.
        source: Description of the images for the summary.
        recorded: Probabilities recorded at validation time, by path.
        tolerance: Largest allowed probability difference.
        onnx: Whether `export_model` is an ExportedClassifier.
        targets: Target cells by path (predictions.csv's target column), for the accuracies.
        mode: "exact" or "agreement" (see `Parity`).
        min_agreement: Least fraction of identical labels ("agreement").
        max_accuracy_drop: Largest accuracy drop against the bundle ("agreement").
    """
    ref = bundle.predict(paths, tta=0)
    if onnx:
        got = export_model.predict([Path(p) for p in ref.paths], tta=0)
        probs = got.probs
        if got.errors:
            raise ImgclfError(f"the export's predictor could not read images the bundle read: "
                              f"{next(iter(got.errors.items()))}")
    else:
        decoded, _, _ = decode_all(list(ref.paths), bundle.preprocess, None, progress=False)
        crops = center_view(decoded.array, bundle.preprocess.size)
        probs = np.concatenate([export_model(crops[i : i + 32]) for i in range(0, len(crops), 32)]) \
            if len(crops) else np.zeros_like(ref.probs)
    diff = np.abs(probs.astype(np.float64) - ref.probs.astype(np.float64))
    top_ref, top_got = ref.probs.argmax(1), probs.argmax(1)
    if bundle.multi_label:
        t = bundle.decision_thresholds()
        same_decision = ((ref.probs >= t) == (probs >= t)).all(1)
    else:
        same_decision = top_ref == top_got
    bad = ~(same_decision & (top_ref == top_got))
    acc_ref = acc_got = None
    known = [(i, targets[Path(p)]) for i, p in enumerate(ref.paths) if Path(p) in (targets or {})]
    if known:
        idx = np.array([i for i, _ in known])
        truth = [t for _, t in known]
        acc_ref = _accuracy(ref.probs[idx], truth, bundle)
        acc_got = _accuracy(probs[idx], truth, bundle)
    rec = None
    if recorded:
        rows = [(i, recorded[Path(p)]) for i, p in enumerate(ref.paths) if Path(p) in recorded]
        if rows:
            rec = float(max(np.abs(probs[i] - r).max() for i, r in rows))
    return Parity(
        images=len(ref.paths), source=source,
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agree=int((top_ref == top_got).sum()), decisions_agree=int(same_decision.sum()),
        tolerance=tolerance, recorded_max_abs_diff=rec,
        mismatched=[str(ref.paths[i]) for i in np.flatnonzero(bad)], mode=mode,
        min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
        accuracy_bundle=acc_ref, accuracy_export=acc_got)


def _accuracy(probs: np.ndarray, truth: list[str], bundle: Bundle) -> float:
    """Top-1 accuracy; multi-label: images whose every class is decided right (as
    `imgclf.evaluation` scores them)."""
    classes = np.array(bundle.classes)
    if bundle.multi_label:
        decided = probs >= bundle.decision_thresholds()
        right = [set(classes[row]) == set(t.split()) for row, t in zip(decided, truth)]
    else:
        right = [t == classes[j] for j, t in zip(probs.argmax(1), truth)]
    return float(np.mean(right))
