"""Metrics of a set of predictions: accuracy, balanced accuracy, F1, AP, ... (single- and multi-label).

Undefined numbers (the AP of a class with no positive example, ...) are None in metric dicts so
that they serialise to strict JSON.
"""

from __future__ import annotations

import numpy as np

from imgclf.evaluation import ranking
from imgclf.evaluation.predictions import Predictions, _require_multi, _require_samples, _require_single


def hamming_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of (image, class) decisions that are right; 1 - Hamming loss.

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return float((y_true == y_pred).mean())


def zero_one_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of images whose whole label set is predicted exactly (subset accuracy).

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return float((y_true == y_pred).all(axis=1).mean())


def f1_macro_multilabel(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the classes that occur in the targets or the decisions.

    A class that is neither present nor predicted has nothing to get right, so it is left out
    rather than counted as 0; this is what scikit-learn's macro F1 does for single-label data.

    Args:
        y_true: 0/1 indicator [N, C].
        y_pred: 0/1 or bool decisions [N, C].
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = (y_true & y_pred).sum(axis=0)
    fp = (~y_true & y_pred).sum(axis=0)
    fn = (y_true & ~y_pred).sum(axis=0)
    return _macro_f1(tp, fp, fn)


def _macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float | np.ndarray:
    """Macro F1 from per-class counts; counts may carry leading axes (e.g. [G, C])."""
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(np.shape(denom)), where=present)
    n_present = present.sum(axis=-1)
    out = np.divide(f1.sum(axis=-1), n_present, out=np.zeros(np.shape(n_present)), where=n_present > 0)
    return float(out) if np.ndim(out) == 0 else out


def single_label_metrics(p: Predictions) -> dict:
    """Headline and per-class numbers of a single-label classifier.

    Returns:
        accuracy, balanced_accuracy (mean recall over classes with validation examples),
        f1_macro (over classes present in targets or predictions, as scikit-learn does),
        loss (mean cross-entropy), top5_accuracy (only when there are more than 5 classes),
        n_samples, and per_class {class: {precision, recall, f1, support}}.
    """
    _require_single(p, "single_label_metrics")
    _require_samples(p)
    y, pred = p.targets, p.predicted
    precision, recall, f1, support = ranking.per_class_prf(y, pred, p.n_classes)
    n_pred = np.bincount(pred, minlength=p.n_classes)
    present = (support > 0) | (n_pred > 0)
    out: dict = {
        "accuracy": float((y == pred).mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "f1_macro": float(f1[present].mean()),
        "loss": float(p.losses.mean()),
    }
    if p.n_classes > 5:
        out["top5_accuracy"] = ranking.top_k_accuracy(y, p.probs, k=5)
    out["n_samples"] = len(y)
    out["per_class"] = {
        c: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
        }
        for j, c in enumerate(p.classes)
    }
    return out


def multi_label_metrics(p: Predictions, thresholds: float | np.ndarray | None = None) -> dict:
    """Headline and per-class numbers of a multi-label classifier.

    Args:
        p: Multi-label predictions.
        thresholds: Decision thresholds (scalar or [C]); default `p.thresholds`, else 0.5.

    Returns:
        hamming_accuracy (label level), zero_one_accuracy (exact match), f1_micro, f1_macro
        (over classes present in targets or decisions), map (mean average precision over the
        classes that have positives; None if none has), loss (mean BCE), thresholds, n_samples,
        and per_class {class: {precision, recall, f1, ap, support}} (ap None without positives).
    """
    _require_multi(p, "multi_label_metrics")
    _require_samples(p)
    if thresholds is None:
        thr = p.decision_thresholds
    else:
        thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (p.n_classes,))
    y = p.targets.astype(bool)
    pred = p.probs >= thr
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    precision, recall, f1, support = ranking.prf_from_counts(tp, fp, fn)
    ap = [ranking.average_precision(y[:, j], p.probs[:, j]) if support[j] else None
          for j in range(p.n_classes)]
    defined = [a for a in ap if a is not None]
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "hamming_accuracy": hamming_accuracy(y, pred),
        "zero_one_accuracy": zero_one_accuracy(y, pred),
        "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
        "f1_macro": _macro_f1(tp, fp, fn),
        "map": float(np.mean(defined)) if defined else None,
        "loss": float(p.losses.mean()),
        "thresholds": [float(t) for t in thr],
        "n_samples": len(y),
        "per_class": {
            c: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "ap": ap[j],
                "support": int(support[j]),
            }
            for j, c in enumerate(p.classes)
        },
    }


def metrics(p: Predictions) -> dict:
    """`multi_label_metrics` or `single_label_metrics`, whichever fits the task."""
    return multi_label_metrics(p) if p.multi_label else single_label_metrics(p)
