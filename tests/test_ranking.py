"""imgclf.evaluation.ranking against scikit-learn, which it replaces on the training path."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from imgclf.evaluation import ranking


def _scores(rng, n: int, ties: bool) -> np.ndarray:
    # Rounded scores give runs of equal values, where curve end points are easy to get wrong.
    s = rng.random(n).astype(np.float32)
    return np.round(s, 1) if ties else s


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_curves_ap_and_auc_equal_scikit_learn(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[0], y[-1] = True, False  # both classes present
    s = _scores(rng, n, ties)
    for got, ref in zip(ranking.precision_recall_curve(y, s), skm.precision_recall_curve(y, s)):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    for got, ref in zip(ranking.roc_curve(y, s), skm.roc_curve(y, s)):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert ranking.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert ranking.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_a_single_distinct_score_and_perfect_ranking():
    y = np.array([1, 0, 1, 0], bool)
    flat = np.full(4, 0.5, np.float32)
    assert ranking.roc_auc(y, flat) == pytest.approx(0.5)
    assert ranking.average_precision(y, flat) == pytest.approx(skm.average_precision_score(y, flat))
    perfect = np.array([0.9, 0.1, 0.8, 0.2], np.float32)
    assert ranking.roc_auc(y, perfect) == 1.0 and ranking.average_precision(y, perfect) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_per_class_prf_and_top_k_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    c, n = 7, 40
    y = rng.integers(0, c - 1, n)  # the last class never occurs: zero support and division
    probs = np.round(rng.random((n, c)), 1)  # ties among the top scores
    pred = probs.argmax(1)
    got = ranking.per_class_prf(y, pred, c)
    ref = skm.precision_recall_fscore_support(y, pred, labels=np.arange(c), zero_division=0)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-12)
    for k in (1, 3, 5):
        assert ranking.top_k_accuracy(y, probs, k) == pytest.approx(
            skm.top_k_accuracy_score(y, probs, k=k, labels=np.arange(c)))


def test_multi_label_counts_equal_scikit_learn():
    from imgclf.evaluation import Predictions, multi_label_metrics, multilabel_confusion

    rng = np.random.default_rng(0)
    y = (rng.random((30, 4)) < 0.4).astype(np.float32)
    y[:, 3] = 0  # a class without positives: AP None, precision and recall 0
    probs = np.round(rng.random((30, 4)), 2).astype(np.float32)
    p = Predictions(paths=[f"{i}.jpg" for i in range(30)], classes=list("abcd"), probs=probs,
                    targets=y, multi_label=True)
    m = multi_label_metrics(p)
    ref = skm.precision_recall_fscore_support(y.astype(bool), probs >= 0.5, average=None,
                                              zero_division=0)
    for j, c in enumerate("abcd"):
        row = m["per_class"][c]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            tuple(float(r[j]) for r in ref))
        if j < 3:
            assert row["ap"] == pytest.approx(skm.average_precision_score(y[:, j], probs[:, j]))
    assert m["per_class"]["d"]["ap"] is None
    np.testing.assert_array_equal(multilabel_confusion(p), skm.multilabel_confusion_matrix(
        y.astype(int), p.predicted.astype(int), labels=np.arange(4)))


def test_training_and_reporting_never_import_scikit_learn():
    import subprocess
    import sys

    code = ("import sys; import numpy as np; from imgclf.evaluation import Predictions, metrics, "
            "pr_curves, roc_curves; p = Predictions(paths=list('wxyz'), probs=np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], "
            "targets=np.array([0, 1, 2, 1]), classes=list('abc')); metrics(p); pr_curves(p); "
            "roc_curves(p); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
