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
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# presize_image and tta_views are re-exported: the predictor's preprocessing is the training one.
from imgclf.data.presize import presize_image, tta_views  # noqa: F401 - torch-free, as training
from imgclf.deploy.exported import META_KEY, ExportedClassifier, checked_meta, load_exported
from imgclf.errors import ImgclfError

ONNX_FILE = "model.onnx"


@dataclass
class OnnxClassifier(ExportedClassifier):
    """An exported classifier (fp32 or int8) in an onnxruntime session.

    Decoding, presizing, TTA and `predict` are `imgclf.deploy.exported.ExportedClassifier`'s.

    Attributes:
        session: The onnxruntime InferenceSession.
        meta: The bundle's model.json (classes, task, preprocess, thresholds, ...).
        path: The .onnx file (None when loaded from bytes).
    """

    session: object
    meta: dict
    path: Path | None = None

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
    meta = checked_meta(raw, None if isinstance(path, bytes) else Path(source))
    names = [o.name for o in session.get_outputs()]
    if "probabilities" not in names:
        raise ImgclfError(f"{source if isinstance(source, str) else 'the model'}: not an imgclf "
                          f"export (outputs {names}): export it with `imgclf export`")
    return OnnxClassifier(session, meta, None if isinstance(path, bytes) else Path(source))


def main(argv: list[str] | None = None) -> int:
    """`python -m imgclf.deploy.onnx_predict MODEL IMAGE...`: one line per image, or JSON with --json."""
    ap = argparse.ArgumentParser(prog="python -m imgclf.deploy.onnx_predict",
                                 description="Predict images with an exported model.onnx, "
                                             "model.int8.onnx or OpenVINO model.xml (no torch).")
    ap.add_argument("model", help="an .onnx or OpenVINO .xml file, or the bundle folder / run "
                                  "directory holding model.onnx")
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=None, help="multi-label threshold override")
    ap.add_argument("--json", action="store_true", help="print JSON lines")
    args = ap.parse_args(argv)
    try:
        clf = load_exported(args.model)
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
