"""Error analysis of a set of predictions: confusion, most-confused pairs, top losses, PR/ROC
curves, calibration and suspected label errors.

Undefined numbers are NaN in curve and calibration data meant for plots.
"""

from __future__ import annotations

import math

import numpy as np

from imgclf.evaluation import ranking
from imgclf.evaluation.predictions import Predictions, _class_index, _require_multi, _require_single


def confusion(p: Predictions) -> np.ndarray:
    """Single-label confusion matrix [C, C] of counts; rows are actual, columns predicted."""
    _require_single(p, "confusion (use multilabel_confusion)")
    c = p.n_classes
    return np.bincount(p.targets * c + p.predicted, minlength=c * c).reshape(c, c)


def confusion_normalized(p: Predictions) -> np.ndarray:
    """Row-normalised confusion matrix: row i is where images of class i went; empty rows stay 0."""
    cm = confusion(p).astype(np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def multilabel_confusion(p: Predictions) -> np.ndarray:
    """Per-class 2x2 matrices [C, 2, 2]: [[tn, fp], [fn, tp]] (scikit-learn's layout)."""
    _require_multi(p, "multilabel_confusion")
    y, pred = p.targets.astype(bool), p.predicted.astype(bool)
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    tn = len(y) - tp - fp - fn
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).astype(np.int64)


def _pair_counts(p: Predictions) -> np.ndarray:
    """[C, C] counts of (actual, predicted) mix-ups, diagonal zero."""
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        missed, spurious = (y & ~pred).astype(np.int64), (~y & pred).astype(np.int64)
        return missed.T @ spurious
    cm = confusion(p)
    np.fill_diagonal(cm, 0)
    return cm


def most_confused(p: Predictions, min_count: int = 1) -> list[tuple[str, str, int]]:
    """Class pairs the model mixes up, most frequent first (ties by actual, then predicted name).

    Single-label: (actual, predicted, count) from the off-diagonal confusion matrix.
    Multi-label: count of images where `actual` was missed while `predicted` was wrongly added.

    Args:
        p: Predictions.
        min_count: Leave out pairs with fewer images.
    """
    counts = _pair_counts(p)
    pairs = [
        (p.classes[a], p.classes[b], int(counts[a, b]))
        for a, b in zip(*np.nonzero(counts >= max(min_count, 1)))
    ]
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))


def top_losses(p: Predictions, k: int | None = None) -> list[int]:
    """Indices of the `k` highest-loss images (all when None), highest first; ties keep order."""
    order = np.argsort(-p.losses, kind="stable")
    return order[:k].tolist()


def confused(p: Predictions, actual: str | int, predicted: str | int, k: int | None = None) -> list[int]:
    """Images of class `actual` the model got wrong, most `predicted`-looking first.

    "The cats with the highest deer probability": among images whose target is `actual` and
    whose prediction is not `actual` (multi-label: labelled `actual` but `actual` missed, and not
    labelled `predicted`), sorted by probs[:, predicted] descending; ties keep image order.

    Args:
        p: Predictions.
        actual: Class name or index of the true class.
        predicted: Class name or index whose probability ranks the images.
        k: How many to return (all when None).
    """
    a, b = _class_index(p, actual), _class_index(p, predicted)
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        mask = y[:, a] & ~pred[:, a] & ~y[:, b]
    else:
        mask = (p.targets == a) & (p.predicted != a)
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(-p.probs[idx, b], kind="stable")]
    return idx[:k].tolist()


def most_confident_wrong(p: Predictions, k_per_class: int = 5) -> dict[str, list[int]]:
    """Per class, the wrong images the model was most sure about, most confident first.

    Single-label: keyed by the actual class; images of that class predicted as another class,
    ranked by the probability of the (wrong) predicted class. Multi-label: per class, the images
    whose decision for that class is wrong, ranked by the probability given to the wrong answer
    (p for a false positive, 1 - p for a false negative). Every class has a key.

    Args:
        p: Predictions.
        k_per_class: How many images per class.
    """
    out: dict[str, list[int]] = {}
    if p.multi_label:
        y, pred = p.targets.astype(bool), p.predicted
        wrong_conf = np.where(pred, p.probs, 1 - p.probs)
        for j, c in enumerate(p.classes):
            idx = np.flatnonzero(y[:, j] != pred[:, j])
            out[c] = idx[np.argsort(-wrong_conf[idx, j], kind="stable")][:k_per_class].tolist()
        return out
    pred = p.predicted
    conf = p.probs[np.arange(len(pred)), pred]
    for j, c in enumerate(p.classes):
        idx = np.flatnonzero((p.targets == j) & (pred != j))
        out[c] = idx[np.argsort(-conf[idx], kind="stable")][:k_per_class].tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Curves and calibration


def _one_vs_rest(p: Predictions, j: int) -> np.ndarray:
    return p.targets[:, j].astype(bool) if p.multi_label else p.targets == j


def pr_curves(p: Predictions) -> dict[str, dict]:
    """One-vs-rest precision-recall curve of every class (as scikit-learn draws it).

    Returns:
        {class: {precision, recall, thresholds, ap}} with lists of floats. A class without
        positive examples has empty lists and ap NaN.
    """
    out = {}
    for j, c in enumerate(p.classes):
        y = _one_vs_rest(p, j)
        if not y.any():
            out[c] = {"precision": [], "recall": [], "thresholds": [], "ap": math.nan}
            continue
        precision, recall, thr = ranking.precision_recall_curve(y, p.probs[:, j])
        out[c] = {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "thresholds": thr.tolist(),
            "ap": ranking.average_precision(y, p.probs[:, j]),
        }
    return out


def roc_curves(p: Predictions) -> dict[str, dict]:
    """One-vs-rest ROC curve of every class (as scikit-learn draws it).

    Returns:
        {class: {fpr, tpr, auc}} with lists of floats. A class without positive or without
        negative examples has empty lists and auc NaN.
    """
    out = {}
    for j, c in enumerate(p.classes):
        y = _one_vs_rest(p, j)
        if y.all() or not y.any():
            out[c] = {"fpr": [], "tpr": [], "auc": math.nan}
            continue
        fpr, tpr, _ = ranking.roc_curve(y, p.probs[:, j])
        out[c] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": ranking.roc_auc(y, p.probs[:, j])}
    return out


def calibration(p: Predictions, n_bins: int = 15) -> dict:
    """Reliability diagram data and expected calibration error (ECE).

    Single-label: each image's top probability against whether the prediction was right.
    Multi-label: every (image, class) probability against that label being present.
    Bins are equal-width over [0, 1] and closed on the right, (lo, hi], the first also taking 0.
    ECE = sum over bins of (count / total) * |accuracy - confidence|.

    Returns:
        bin_edges [n_bins + 1], accuracy and confidence per bin (NaN where a bin is empty),
        counts per bin, and ece.
    """
    if p.multi_label:
        conf = p.probs.ravel().astype(np.float64)
        hit = p.targets.ravel().astype(np.float64)
    else:
        conf = p.probs.max(axis=1).astype(np.float64)
        hit = p.correct.astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=hit, minlength=n_bins) / counts
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / counts
    filled = counts > 0
    gaps = np.abs(acc[filled] - mean_conf[filled])
    ece = float((counts[filled] / counts.sum() * gaps).sum()) if filled.any() else 0.0
    return {
        "bin_edges": edges.tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "counts": counts.tolist(),
        "ece": ece,
    }


# ---------------------------------------------------------------------------------------------
# Label issues


def label_issues(probs: np.ndarray, targets: np.ndarray, classes: list[str]) -> list[dict]:
    """Rank images whose given label looks wrong, confident-learning style.

    Each class j gets a threshold t_j: the mean probability of j over the images labelled j (how
    sure the model typically is when j is right). An image labelled y is suspect when some other
    class j has probs[j] >= t_j and probs[j] > probs[y]; the suggested label is the most probable
    such class and the score is the margin probs[suggested] - probs[y]. A class nobody is labelled
    with has no threshold and is never suggested. Use out-of-sample probabilities (validation, or
    cross-validated), or the model will have memorised the wrong labels.

    Args:
        probs: Softmax outputs [N, C].
        targets: Given class index per image [N] (single-label only).
        classes: Class names.

    Returns:
        Rows {index, given, suggested, score, given_prob, suggested_prob}, highest score first
        (ties by index).
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError("label_issues handles single-label targets [N] only")
    targets = targets.astype(np.int64)
    n, c = probs.shape
    counts = np.bincount(targets, minlength=c)
    sums = np.bincount(targets, weights=probs[np.arange(n), targets], minlength=c)
    thresholds = np.divide(sums, counts, out=np.full(c, np.inf), where=counts > 0)
    given = probs[np.arange(n), targets]
    candidate = (probs >= thresholds) & (probs > given[:, None])
    candidate[np.arange(n), targets] = False
    masked = np.where(candidate, probs, -np.inf)
    suggested = masked.argmax(axis=1)
    rows = [
        {
            "index": int(i),
            "given": classes[targets[i]],
            "suggested": classes[suggested[i]],
            "score": float(probs[i, suggested[i]] - given[i]),
            "given_prob": float(given[i]),
            "suggested_prob": float(probs[i, suggested[i]]),
        }
        for i in np.flatnonzero(candidate.any(axis=1))
    ]
    return sorted(rows, key=lambda r: (-r["score"], r["index"]))


def rank_label_issues(preds: Predictions) -> list[dict]:
    """Every image whose given label is not its most probable class, most suspect first.

    Args:
        preds: Single-label, out-of-sample predictions.

    Returns:
        Rows {index, given, suggested, score, given_prob, suggested_prob, confident}: suggested
        is the most probable class, score the margin probs[suggested] - probs[given] (highest
        first, ties by index), confident whether `label_issues` flags the image too.
    """
    flagged = {r["index"] for r in label_issues(preds.probs, preds.targets, preds.classes)}
    n = len(preds.paths)
    given = preds.probs[np.arange(n), preds.targets]
    top = preds.probs.argmax(axis=1)
    rows = [
        {"index": int(i), "given": preds.classes[preds.targets[i]],
         "suggested": preds.classes[top[i]], "score": float(preds.probs[i, top[i]] - given[i]),
         "given_prob": float(given[i]), "suggested_prob": float(preds.probs[i, top[i]]),
         "confident": int(i) in flagged}
        for i in np.flatnonzero(preds.probs[np.arange(n), top] > given)
    ]
    return sorted(rows, key=lambda r: (-r["score"], r["index"]))
