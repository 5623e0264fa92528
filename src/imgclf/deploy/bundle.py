"""The model bundle: weights.safetensors + model.json, everything needed to predict as validated.

No pickle anywhere: weights are a safetensors state dict, metadata is JSON. Loading checks that
the files exist, parse, and fit the architecture they name, and says which fix applies if not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from imgclf import __version__
from imgclf.config import check_tta
from imgclf.data.transforms import Preprocess
from imgclf.deploy.predict import predict_files
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_bytes, atomic_write_json

WEIGHTS, META = "weights.safetensors", "model.json"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    """A trained classifier ready to predict.

    Attributes:
        model: The network, in eval mode.
        arch: timm architecture name.
        classes: Class names in output order.
        multi_label: Sigmoid outputs with per-class decision thresholds.
        preprocess: Exact preprocessing validation used.
        thresholds: Multi-label decision thresholds, one per class.
        tta: Test-time augmentation the user chose ({"n": views, "reduce": "mean"|"max"}).
        meta: Everything else in model.json.
        path: The bundle folder.
    """

    model: nn.Module
    arch: str
    classes: list[str]
    multi_label: bool
    preprocess: Preprocess
    thresholds: list[float] | None = None
    tta: dict | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def predict(self, paths, batch_size: int = 32, tta: int | None = None,
                threshold: float | None = None, tta_reduce: str | None = None):
        """Predict files; see `imgclf.deploy.predict.predict_files`."""
        return predict_files(self, paths, batch_size=batch_size, tta=tta,
                             threshold=threshold, tta_reduce=tta_reduce)

    def tta_setting(self, n: int | None = None, reduce: str | None = None) -> tuple[int, str]:
        """(views added, reduction): the arguments where given, else what training chose."""
        saved = self.tta or {}
        n = int(n if n is not None else saved.get("n", 0))
        reduce = reduce or saved.get("reduce") or "mean"
        check_tta(n, reduce)
        return n, reduce

    def decision_thresholds(self, override: float | None = None) -> np.ndarray:
        """Per-class thresholds (multi-label): the override, the tuned ones, or 0.5."""
        c = len(self.classes)
        if override is not None:
            return np.full(c, float(override))
        if self.thresholds is not None:
            return np.asarray(self.thresholds, dtype=float)
        return np.full(c, 0.5)


def save_bundle(
    folder: str | Path,
    model: nn.Module,
    arch: str,
    classes: list[str],
    multi_label: bool,
    preprocess: Preprocess,
    thresholds: list[float] | None = None,
    tta: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the bundle atomically (weights first, model.json last, so a complete model.json
    always points at complete weights)."""
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, save(state))
    meta = {
        "format": "imgclf-bundle",
        "format_version": FORMAT_VERSION,
        "imgclf_version": __version__,
        "arch": arch,
        "classes": list(classes),
        "num_classes": len(classes),
        "task": "multi_label" if multi_label else "single_label",
        "preprocess": preprocess.to_dict(),
        "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
        "tta": tta,
        **(extra or {}),
    }
    atomic_write_json(folder / META, meta)
    return folder


def find_bundle(path: str | Path) -> Path:
    """The bundle folder for a run directory, a bundle folder, or a file inside one."""
    p = Path(path)
    for cand in (p, p / "model", p.parent):
        if (cand / META).is_file():
            return cand
    raise ImgclfError(
        f"{p} is not a run directory or model bundle (no {META} found): pass runs/<name> "
        "or runs/<name>/model")


def load(path: str | Path, device: str = "cpu") -> Bundle:
    """Load a bundle from a run directory or bundle folder.

    Raises:
        ImgclfError: Missing, corrupt or mismatched files, each with the fix.
    """
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = find_bundle(path)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        arch, classes = meta["arch"], list(meta["classes"])
        pre = Preprocess.from_dict(meta["preprocess"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImgclfError(f"{folder / META} is damaged ({type(e).__name__}: {e}): "
                          "re-export the bundle from its run, or retrain") from e
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ImgclfError(f"{folder} was written by a newer imgclf ({meta.get('imgclf_version')}):"
                          " upgrade imgclf to load it")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ImgclfError(f"{weights} is missing: the bundle is incomplete; copy the whole "
                          "model/ folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ImgclfError(f"{weights} is not a valid safetensors file ({e}): the bundle is "
                          "corrupt; copy it again or retrain") from e
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
    except (RuntimeError, ValueError) as e:
        raise ImgclfError(f"{folder}: unknown architecture '{arch}' ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        text = " ".join(str(e).split())[:300]
        raise ImgclfError(f"{weights} does not fit architecture '{arch}' with {len(classes)} "
                          f"classes ({text}): the weights and model.json come from different "
                          "models; copy the whole model/ folder of one run") from e
    model.to(device).eval()
    return Bundle(model=model, arch=arch, classes=classes,
                  multi_label=meta.get("task") == "multi_label", preprocess=pre,
                  thresholds=meta.get("thresholds"), tta=meta.get("tta"), meta=meta, path=folder)
