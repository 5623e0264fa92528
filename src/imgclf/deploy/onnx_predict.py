"""Predict with an exported model.onnx using only numpy, Pillow and onnxruntime: no torch.

The ONNX graph takes uint8 crops [N, 3, S, S] and returns (probabilities, logits); normalisation
and the softmax/sigmoid are inside the graph. What happens before the graph is done here exactly
as training did it: decode with `imgclf.data.images.open_rgb` (EXIF orientation, alpha on white,
16-bit scaling), resize the short side to `presize` with Pillow and center-crop a square, then
take the center `size` crop. The settings come from the copy of model.json embedded in the file.

Deploy without torch:
    pip install --no-deps imgclf && pip install numpy pillow onnxruntime
    python -m imgclf.deploy.onnx_predict runs/<name>/model/model.onnx photo.jpg

This module imports nothing that imports torch (a test runs it with torch blocked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.files import list_images  # torch-free, the walker `train` and `predict` use
from imgclf.data.images import open_rgb
from imgclf.data.presize import (check_preprocess, presize_image, reduce_views,  # torch-free,
                                 tta_views)  # as training
from imgclf.deploy.results import PredictionResult
from imgclf.errors import ImageError, ImgclfError

ONNX_FILE = "model.onnx"
META_KEY = "imgclf_model_json"

@dataclass
class OnnxClassifier:
    """An exported classifier in an onnxruntime session.

    Attributes:
        session: The onnxruntime InferenceSession.
        meta: The bundle's model.json (classes, task, preprocess, thresholds, ...).
        path: The .onnx file (None when loaded from bytes).
    """

    session: object
    meta: dict
    path: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def multi_label(self) -> bool:
        return self.meta.get("task") == "multi_label"

    @property
    def preprocess(self) -> dict:
        return self.meta["preprocess"]

    def decision_thresholds(self, override: float | None = None) -> np.ndarray:
        """Per-class thresholds (multi-label): the override, the tuned ones, or 0.5."""
        c = len(self.classes)
        if override is not None:
            return np.full(c, float(override))
        if self.meta.get("thresholds") is not None:
            return np.asarray(self.meta["thresholds"], dtype=float)
        return np.full(c, 0.5)

    def run_crops(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, C] for uint8 crops [N, 3, S, S], in batches.

        A model exported with a static batch size gets exactly that many images per call (the
        last call padded), so both kinds of export work here.
        """
        inp = self.session.get_inputs()[0]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        step = fixed or max(1, batch_size)
        out = []
        for start in range(0, len(crops), step):
            chunk = np.ascontiguousarray(crops[start : start + step], dtype=np.uint8)
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), np.uint8)])
            probs = self.session.run(["probabilities"], {inp.name: chunk})[0]
            out.append(np.asarray(probs, dtype=np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

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
                threshold: float | None = None, names: list[str] | None = None) -> PredictionResult:
        """Predict image files, folders, bytes or PIL images.

        Args:
            images: Paths (files or folders, searched for image files), bytes or PIL images.
            batch_size: Images per onnxruntime call.
            tta: Augmented views to add (None: the bundle's setting, usually none).
            threshold: Override the bundle's multi-label thresholds.
            names: Names for in-memory images (default: their position).

        Returns:
            Probabilities and decisions; unreadable images are listed in `errors`, not raised.
        """
        items = _expand(images if isinstance(images, (list, tuple)) else [images])
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
        probs = self.predict_presized(arr, batch_size, tta) if squares else np.zeros(
            (0, len(self.classes)), np.float32)
        return PredictionResult([Path(n) for n in kept], probs, self.classes, self.multi_label,
                                self.decision_thresholds(threshold) if self.multi_label else None,
                                errors)


def _expand(items: list) -> list:
    """Folders replaced by the image files under them (the one walker); anything else kept."""
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            out += list_images([item]).files
        else:
            out.append(item)
    return out


def find_onnx(path: str | Path) -> Path:
    """The .onnx file for a path: the file itself, or model.onnx in a bundle folder or run."""
    p = Path(path)
    for cand in (p, p / ONNX_FILE, p / "model" / ONNX_FILE):
        if cand.is_file():
            return cand
    raise ImgclfError(f"{p}: no {ONNX_FILE} found; create it with `imgclf export {p} --format onnx`")


def load(path: str | Path | bytes, providers: list[str] | None = None,
         threads: int | None = None) -> OnnxClassifier:
    """Load an exported model: a .onnx file, a bundle folder or run directory holding one, or bytes.

    Args:
        path: Where the model is, or its serialised bytes.
        providers: onnxruntime execution providers (default: CPU).
        threads: Intra-op threads (default: onnxruntime's choice).

    Raises:
        ImgclfError: No model, not an imgclf export, or onnxruntime cannot load it.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImgclfError("onnxruntime is not installed: pip install onnxruntime") from None
    source = path if isinstance(path, bytes) else str(find_onnx(path))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(source, sess_options=opts,
                                       providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own unrelated classes
        where = "the model bytes" if isinstance(path, bytes) else source
        raise ImgclfError(f"{where}: onnxruntime cannot load it ({type(e).__name__}: "
                          f"{str(e)[:200]}): export it again with `imgclf export`") from e
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    meta = json.loads(raw) if raw else _sidecar_meta(source)
    try:
        check_preprocess(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise ImgclfError(f"{source if isinstance(source, str) else 'the model'}: its model.json "
                          f"settings are damaged ({e}): export it again with `imgclf export`") from e
    names = [o.name for o in session.get_outputs()]
    if "probabilities" not in names:
        raise ImgclfError(f"{source if isinstance(source, str) else 'the model'}: not an imgclf "
                          f"export (outputs {names}): export it with `imgclf export`")
    return OnnxClassifier(session, meta, None if isinstance(path, bytes) else Path(source))


def _sidecar_meta(source) -> dict:
    p = Path(source).with_name("model.json") if isinstance(source, str) else None
    if p is None or not p.is_file():
        raise ImgclfError(f"{source if p else 'the model'}: no imgclf metadata in the file and "
                          "no model.json beside it: export it again with `imgclf export`")
    return json.loads(p.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """`python -m imgclf.deploy.onnx_predict MODEL IMAGE...`: one line per image, or JSON with --json."""
    ap = argparse.ArgumentParser(prog="python -m imgclf.deploy.onnx_predict",
                                 description="Predict images with an exported model.onnx (no torch).")
    ap.add_argument("model", help="model.onnx, or the bundle folder / run directory holding it")
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=None, help="multi-label threshold override")
    ap.add_argument("--json", action="store_true", help="print JSON lines")
    args = ap.parse_args(argv)
    try:
        clf = load(args.model)
        res = clf.predict(args.images, threshold=args.threshold)
    except ImgclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, reason in res.errors.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for name, labs, top in zip(res.names, res.labels(), res.top_k(args.top_k)):
        if args.json:
            print(json.dumps({"image": name, "labels": labs,
                              "top": [{"label": c, "probability": p} for c, p in top]}))
        else:
            print(f"{name}\t{' '.join(labs)}\t" + "  ".join(f"{c} {p:.3f}" for c, p in top))
    return 0 if res.names else 2


if __name__ == "__main__":
    sys.exit(main())
