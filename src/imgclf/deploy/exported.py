"""What every torch-free predictor of an export shares: decoding, presizing, TTA, the result.

An export (ONNX fp32 or int8, OpenVINO IR) takes uint8 crops [N, 3, S, S] and returns
probabilities; everything before the graph is done here exactly as training did it: decode with
`imgclf.data.images.open_rgb` (EXIF orientation, alpha on white, 16-bit scaling), presize with
`imgclf.data.presize` (Pillow and numpy), take the center `size` crop (or the TTA views). A
backend only implements `run_crops`. Results are `imgclf.deploy.results.PredictionResult`, the
type the torch predictor returns too.

This module imports nothing that imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.files import list_images  # torch-free, the walker `train` and `predict` use
from imgclf.data.images import open_rgb
from imgclf.data.presize import check_preprocess, presize_image, reduce_views, tta_views
from imgclf.deploy.results import PredictionResult
from imgclf.errors import ImageError, ImgclfError

META_KEY = "imgclf_model_json"


class ExportedClassifier:
    """The shared part of the torch-free predictors; subclasses set `meta`, `path` and
    implement `run_crops`."""

    meta: dict
    path: Path | None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def multi_label(self) -> bool:
        return self.meta.get("task") == "multi_label"

    @property
    def preprocess(self) -> dict:
        return self.meta["preprocess"]

    @property
    def arch(self) -> str:
        return str(self.meta.get("arch", "exported model"))

    @property
    def thresholds(self) -> list[float] | None:
        return self.meta.get("thresholds")

    @property
    def tta(self) -> dict | None:
        return self.meta.get("tta")

    @property
    def weights_file(self) -> Path | None:
        """The file holding the weights (what a version digest is taken of)."""
        return self.path

    def decision_thresholds(self, override: float | None = None) -> np.ndarray:
        """Per-class thresholds (multi-label): the override, the tuned ones, or 0.5."""
        c = len(self.classes)
        if override is not None:
            return np.full(c, float(override))
        if self.meta.get("thresholds") is not None:
            return np.asarray(self.meta["thresholds"], dtype=float)
        return np.full(c, 0.5)

    def run_crops(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, C] for uint8 crops [N, 3, S, S], in batches."""
        raise NotImplementedError

    def presized(self, image, max_pixels: int = 64_000_000) -> np.ndarray:
        """Decode one file path, bytes or PIL image into the presized uint8 square."""
        pre = self.preprocess
        if isinstance(image, Image.Image):
            img = image.convert("RGB")
        else:
            img = open_rgb(image, max_pixels=max_pixels)
        return presize_image(img, int(pre["presize"]), pre.get("interpolation", "bicubic"),
                             pre.get("resize", "crop"))

    def predict_presized(self, squares: np.ndarray, batch_size: int = 32, tta: int | None = None,
                         reduce: str | None = None) -> np.ndarray:
        """Probabilities for presized squares [N, 3, P, P], with the bundle's TTA setting."""
        cfg = self.meta.get("tta") or {}
        n = int(cfg.get("n", 0) if tta is None else tta)
        reduce = reduce or cfg.get("reduce", "mean")
        views = [self.run_crops(v, batch_size) for v in
                 tta_views(squares, int(self.preprocess["size"]), n)]
        return reduce_views(np.stack(views), reduce, self.multi_label)

    def predict(self, images, batch_size: int = 32, tta: int | None = None,
                threshold: float | None = None, names: list[str] | None = None,
                tta_reduce: str | None = None) -> PredictionResult:
        """Predict image files, folders, globs, bytes or PIL images.

        Args:
            images: Paths (files, folders searched for image files, globs), bytes or PIL images.
            batch_size: Images per runtime call.
            tta: Augmented views to add (None: the bundle's setting, usually none).
            threshold: Override the bundle's multi-label thresholds.
            names: Names for in-memory images (default: their position).
            tta_reduce: "mean" or "max" over TTA views (None: the bundle's setting, else mean).

        Returns:
            Probabilities and decisions; unreadable images are listed in `errors`, not raised.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ImgclfError(f"--threshold {threshold:g} is not a probability: pass a number "
                              "from 0 to 1")
        items = expand(images if isinstance(images, (list, tuple)) else [images])
        squares, kept, errors = [], [], {}
        for i, item in enumerate(items):
            name = names[i] if names else (os.fsdecode(item) if isinstance(item, (str, os.PathLike))
                                           else f"image {i}")
            try:
                squares.append(self.presized(item))
                kept.append(name)
            except ImageError as e:
                errors[name] = e.reason
        pre = self.preprocess
        arr = np.stack(squares) if squares else np.zeros(
            (0, 3, int(pre["presize"]), int(pre["presize"])), np.uint8)
        probs = self.predict_presized(arr, batch_size, tta, tta_reduce) if squares else np.zeros(
            (0, len(self.classes)), np.float32)
        return PredictionResult([Path(n) for n in kept], probs, self.classes, self.multi_label,
                                self.decision_thresholds(threshold) if self.multi_label else None,
                                errors)


def expand(items: list) -> list:
    """Folders and globs replaced by the image files they name (the one walker); anything else
    kept (a missing file is then reported in the result's errors, not raised)."""
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and (
                Path(item).is_dir() or any(c in os.fsdecode(item) for c in "*?[")):
            out += list_images([item]).files
        else:
            out.append(item)
    return out


def checked_meta(raw: str | None, source: Path | None) -> dict:
    """model.json from the copy embedded in an export (else the one beside it), checked."""
    meta = json.loads(raw) if raw else sidecar_meta(source)
    where = source if source is not None else "the model"
    try:
        check_preprocess(meta["preprocess"])
        meta["classes"]  # noqa: B018 - a KeyError here is a damaged model.json
    except (KeyError, TypeError, ValueError) as e:
        raise ImgclfError(f"{where}: its model.json settings are damaged ({e}): export it again "
                          "with `imgclf export`") from e
    return meta


def sidecar_meta(source: Path | None) -> dict:
    """The model.json beside an export that has none embedded."""
    p = Path(source).with_name("model.json") if source is not None else None
    if p is None or not p.is_file():
        raise ImgclfError(f"{source if p else 'the model'}: no imgclf metadata in the file and "
                          "no model.json beside it: export it again with `imgclf export`")
    return json.loads(p.read_text(encoding="utf-8"))


def load_exported(path: str | Path, threads: int | None = None) -> ExportedClassifier:
    """Load any export by its file name: a .xml is an OpenVINO IR, anything else ONNX (a file,
    or model.onnx in a bundle folder or run directory).

    Raises:
        ImgclfError: No model, not an imgclf export, or its runtime is missing or refuses it.
    """
    # lazy: each backend imports its runtime (onnxruntime, openvino) and subclasses this module
    from imgclf.deploy import onnx_predict, openvino_predict

    if Path(path).suffix.lower() == ".xml":
        return openvino_predict.load(path, threads=threads)
    return onnx_predict.load(path, threads=threads)


def is_export_file(path: str | Path) -> bool:
    """Whether a path names an exported model file (.onnx, OpenVINO .xml) rather than a bundle."""
    p = Path(path)
    return p.suffix.lower() in (".onnx", ".xml") and p.is_file()
