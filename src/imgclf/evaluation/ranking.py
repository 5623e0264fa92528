"""The classification metrics imgclf reports, in numpy, equal to scikit-learn's.

Why not scikit-learn here: importing `sklearn.metrics` costs 0.4-1.0 s (it pulls in scipy and,
where installed, pandas), which every `train`, `evaluate` and `cv` paid for seven functions:
3-6% of a small run's wall time (fridgeObjects, 86 training images: 15.6 s). Each function
here follows scikit-learn 1.9's definition step for step (ties, the curves' end points, zero
division as 0) and tests/test_ranking.py holds it to scikit-learn's output on random data with
ties; scikit-learn stays a dependency (group splits, the demo data).
"""

from __future__ import annotations

import numpy as np


def per_class_prf(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple:
    """Precision, recall, F1 and support of every class of single-label predictions.

    As `sklearn.metrics.precision_recall_fscore_support(..., labels=range(C),
    zero_division=0)`: a ratio whose denominator is zero is 0.

    Args:
        y_true: Class indices [N].
        y_pred: Predicted class indices [N].
        n_classes: C.

    Returns:
        (precision, recall, f1, support), each [C].
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    support = np.bincount(y_true, minlength=n_classes)
    predicted = np.bincount(y_pred, minlength=n_classes)
    return prf_from_counts(tp, predicted - tp, support - tp)


def prf_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple:
    """(precision, recall, f1, support) from per-class true/false positive and false negative
    counts, zero where a denominator is zero (scikit-learn's F1 is 2tp / (2tp + fp + fn))."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    return (_ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn),
            (tp + fn).astype(np.int64))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.shape(num)), where=den != 0)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of images whose class is among the `k` highest scores (ties as scikit-learn
    breaks them: among equal scores the higher class index ranks first)."""
    ranked = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float((ranked == np.asarray(y_true)[:, None]).any(axis=1).mean())


def _clf_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, threshold) at each distinct score, highest first."""
    score = np.asarray(score)
    # Counts are read at the last image of each run of equal scores, so the order within a
    # run does not matter.
    order = np.argsort(-score, kind="stable")
    score, y = score[order], np.asarray(y, dtype=np.float64)[order]
    last = np.r_[np.nonzero(np.diff(score))[0], len(y) - 1]
    tps = np.cumsum(y)[last]
    fps = 1 + last.astype(np.float64) - tps
    return fps, tps, score[last]


def precision_recall_curve(y: np.ndarray, score: np.ndarray) -> tuple:
    """(precision, recall, thresholds) of a binary problem, as scikit-learn returns them:
    thresholds ascending, precision ending in 1 and recall in 0. `y` holds at least one
    positive."""
    fps, tps, thresholds = _clf_curve(y, score)
    precision = _ratio(tps, tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the step integral of the precision-recall curve, no interpolation)."""
    precision, recall, _ = precision_recall_curve(y, score)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple:
    """(fpr, tpr, thresholds) of a binary problem with positives and negatives, starting at
    (0, 0) with threshold inf; points on a straight segment between two others are dropped,
    as scikit-learn's drop_intermediate does."""
    fps, tps, thresholds = _clf_curve(y, score)
    if len(fps) > 2:
        keep = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds.astype(np.float64)]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids), for `y` with positives and negatives."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)
