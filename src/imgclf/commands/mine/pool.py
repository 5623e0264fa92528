"""The pool: listing, scoring and picking its most confident false positives (the pure selection
rules are plain numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf import progress
from imgclf.commands.mine.state import SCORE_CHUNK
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.files import list_images
from imgclf.deploy.predict import predict_images
from imgclf.errors import DataError, display_path


def split_pool(paths: list[Path], valid_pct: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split pool images once into a mining part U and a held-out part V (seeded).

    The order of `paths` does not matter: they are sorted first, so the same files and seed give
    the same split. V gets round(valid_pct * N) images, at least one when N >= 2.
    """
    ordered = sorted(dict.fromkeys(Path(p) for p in paths), key=str)
    n_valid = int(round(valid_pct * len(ordered)))
    if len(ordered) >= 2:
        n_valid = min(max(n_valid, 1), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    valid = {int(i) for i in perm[:n_valid]}
    return ([p for i, p in enumerate(ordered) if i not in valid],
            [p for i, p in enumerate(ordered) if i in valid])


def false_positive_scores(probs: np.ndarray, negative_index: int | None = None,
                          thresholds: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image of none of the classes: predicted class, its confidence, false positive or not.

    Single-label: the predicted class is the argmax over the positive classes and its
    probability the confidence; the image is a false positive when the overall argmax is not
    the negative class. Multi-label (`negative_index` None): the confidence is the highest class
    probability, and the image is a false positive when any class reaches its threshold.

    Args:
        probs: [N, C] probabilities.
        negative_index: Column of the negative class (single-label); None for multi-label.
        thresholds: Multi-label decision thresholds [C] (default 0.5).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if negative_index is None:
        thr = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
        is_fp = (probs >= thr).any(axis=1)
        return probs.argmax(axis=1), probs.max(axis=1), is_fp
    positive = probs.copy()
    positive[:, negative_index] = -np.inf
    predicted = positive.argmax(axis=1)
    is_fp = probs.argmax(axis=1) != negative_index
    return predicted, positive.max(axis=1), is_fp


def top_false_positives(confidence: np.ndarray, is_fp: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most confident false positives, most confident first (ties: lower index)."""
    idx = np.flatnonzero(np.asarray(is_fp))
    order = np.lexsort((idx, -np.asarray(confidence)[idx]))
    return idx[order[:k]]


def better(a: dict, b: dict | None) -> bool:
    """Whether round metrics `a` beat `b`: overall accuracy, then fewer held-out false
    positives, then positive accuracy (ties keep the earlier round)."""
    if b is None:
        return True

    def key(m: dict) -> tuple[float, float, float]:
        return (round(m["overall_accuracy"], 9), -round(m["fp_rate_V"], 9),
                round(m["positive_accuracy"], 9))

    return key(a) > key(b)


# ---------------------------------------------------------------------------------------------
# Images


def _predict(model, pre, decoded: DecodedImages, multi_label: bool, batch_size: int) -> np.ndarray:
    """Probabilities in float32 on the center crop: exactly what validation and predict see."""
    device = next(model.parameters()).device
    return predict_images(model, pre, decoded, multi_label, batch_size=batch_size, device=device)


def _list_images(folder: str | Path, flag: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{display_path(folder)} is not a folder: pass {flag} a folder of images "
                        "that contain none of the classes")
    paths = [p.resolve() for p in list_images([folder.resolve()]).files]
    if not paths:
        raise DataError(f"{display_path(folder)} holds no images: pass {flag} a folder of images "
                        "that contain none of the classes")
    return paths


@dataclass
class _PoolScore:
    picks: list[dict]
    scored: int
    false_positives: int
    unreadable: dict[str, str]


def score_pool(model, pre, paths: list[Path], multi_label: bool, negative_index: int | None,
               thresholds: np.ndarray | None, classes: list[str], k: int,
               skip_digests: set[str], cache_dir: Path | None, batch_size: int = 64,
               description: str = "Scoring the pool") -> _PoolScore:
    """Score pool images chunk by chunk and return the k most confident false positives.

    Only three numbers per image are kept (predicted class, confidence, false positive or not),
    and images are decoded SCORE_CHUNK at a time, so memory does not grow with the pool.
    Images whose content equals one in `skip_digests` (a training or validation image, or an
    earlier copy in the pool) are not scored.
    """
    seen = set(skip_digests)
    kept: list[Path] = []
    predicted, confidence, is_fp = [], [], []
    unreadable: dict[str, str] = {}
    with progress.task(description, total=len(paths)) as advance:
        for start in range(0, len(paths), SCORE_CHUNK):
            chunk = paths[start:start + SCORE_CHUNK]
            decoded, errors, _ = decode_all(chunk, pre, cache_dir, progress=False)
            unreadable.update({str(p): why for p, why in errors.items()})
            fresh = []
            for i, d in enumerate(decoded.digests):
                if d not in seen:
                    seen.add(d)
                    fresh.append(i)
            if fresh:
                sub = decoded.subset(fresh)
                probs = _predict(model, pre, sub, multi_label, batch_size)
                p, c, f = false_positive_scores(probs, negative_index, thresholds)
                kept += sub.paths
                predicted.append(p)
                confidence.append(c)
                is_fp.append(f)
            advance(len(chunk))
    if not kept:
        return _PoolScore([], 0, 0, unreadable)
    predicted_a, confidence_a, fp_a = (np.concatenate(predicted), np.concatenate(confidence),
                                       np.concatenate(is_fp))
    top = top_false_positives(confidence_a, fp_a, k)
    picks = [{"path": str(kept[i]), "predicted": classes[int(predicted_a[i])],
              "confidence": float(confidence_a[i])} for i in top]
    return _PoolScore(picks, len(kept), int(fp_a.sum()), unreadable)
