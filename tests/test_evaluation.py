"""Tests of imgclf.evaluation on small hand-made and synthetic arrays (no model, no torch)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from imgclf import evaluation as ev
from imgclf.evaluation import Predictions

# The worked example of label-level vs exact-match accuracy.
Y_TRUE = np.array([[1, 0, 0, 1], [1, 0, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]])
Y_PRED = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]])


def single(probs, targets, classes=("cat", "deer", "dog")) -> Predictions:
    probs = np.asarray(probs, dtype=np.float64)
    return Predictions([f"img{i}.jpg" for i in range(len(probs))], list(classes), probs, np.asarray(targets))


def multi(probs, targets, classes=None, thresholds=None) -> Predictions:
    probs = np.asarray(probs, dtype=np.float64)
    classes = classes or [f"c{j}" for j in range(probs.shape[1])]
    paths = [f"img{i}.jpg" for i in range(len(probs))]
    return Predictions(paths, classes, probs, np.asarray(targets), True, thresholds)


@pytest.fixture
def three_class() -> Predictions:
    # targets 0 0 1 1 2 2, predicted 0 1 1 1 2 0
    probs = [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
    return single(probs, [0, 0, 1, 1, 2, 2])


# --- Predictions --------------------------------------------------------------------------------


def test_predictions_properties(three_class):
    p = three_class
    assert p.predicted.tolist() == [0, 1, 1, 1, 2, 0]
    assert p.correct.tolist() == [True, False, True, True, True, False]
    expected = -np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.4])
    np.testing.assert_allclose(p.losses, expected)


def test_predictions_multi_label_properties():
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4]])
    p = multi(probs, [[1, 0, 0], [0, 1, 0]])
    assert p.predicted.tolist() == [[True, False, True], [False, True, False]]
    assert p.correct.tolist() == [False, True]
    y = p.targets
    bce = -(y * np.log(probs) + (1 - y) * np.log(1 - probs)).mean(axis=1)
    np.testing.assert_allclose(p.losses, bce)
    p.thresholds = np.array([0.5, 0.5, 0.65])
    assert p.predicted.tolist() == [[True, False, False], [False, True, False]]


def test_losses_are_finite_for_saturated_probabilities():
    p = single([[1.0, 0.0, 0.0]], [1])
    assert np.isfinite(p.losses).all() and p.losses[0] > 20


def test_predictions_validates_shapes():
    with pytest.raises(ValueError):
        single([[0.5, 0.5]], [0])  # 2 columns, 3 classes
    with pytest.raises(ValueError):
        single([[0.5, 0.3, 0.2]], [3])
    with pytest.raises(ValueError):
        multi([[0.5, 0.3]], [[1, 2]])


# --- metrics ------------------------------------------------------------------------------------


def test_worked_example_hamming_and_zero_one():
    assert ev.hamming_accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.85)
    assert ev.zero_one_accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.4)


def test_multi_label_metrics_on_worked_example():
    # probabilities whose 0.5-decisions are Y_PRED, with distinct values so AP is informative
    rng = np.random.default_rng(0)
    probs = np.where(Y_PRED == 1, rng.uniform(0.55, 0.95, Y_PRED.shape), rng.uniform(0.05, 0.45, Y_PRED.shape))
    m = ev.multi_label_metrics(multi(probs, Y_TRUE))
    assert m["hamming_accuracy"] == pytest.approx(0.85)
    assert m["zero_one_accuracy"] == pytest.approx(0.4)
    assert m["f1_micro"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="micro"))
    # every class has positives here, so macro F1 equals scikit-learn's
    assert m["f1_macro"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    aps = [skm.average_precision_score(Y_TRUE[:, j], probs[:, j]) for j in range(4)]
    assert m["map"] == pytest.approx(np.mean(aps))
    for j, c in enumerate(["c0", "c1", "c2", "c3"]):
        row = m["per_class"][c]
        assert row["ap"] == pytest.approx(aps[j])
        assert row["support"] == Y_TRUE[:, j].sum()
        assert row["precision"] == pytest.approx(skm.precision_score(Y_TRUE[:, j], Y_PRED[:, j]))
        assert row["recall"] == pytest.approx(skm.recall_score(Y_TRUE[:, j], Y_PRED[:, j]))
    assert m["loss"] == pytest.approx(multi(probs, Y_TRUE).losses.mean())
    json.dumps(m, allow_nan=False)


def test_multi_label_metrics_threshold_argument_and_absent_class():
    probs = np.array([[0.9, 0.3, 0.1], [0.6, 0.8, 0.2], [0.2, 0.4, 0.1]])
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    p = multi(probs, targets)
    m = ev.multi_label_metrics(p, thresholds=0.35)  # decisions [[1,0,0],[1,1,0],[0,1,0]]: all right
    assert m["zero_one_accuracy"] == 1.0 and m["hamming_accuracy"] == 1.0
    # class c2 has no positives and no predictions: left out of macro F1, AP undefined (None)
    assert m["f1_macro"] == 1.0
    assert m["per_class"]["c2"]["ap"] is None
    assert m["map"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)
    assert ev.metrics(p)["zero_one_accuracy"] == pytest.approx(2 / 3)  # at 0.5 row 2 misses c1


def test_single_label_metrics(three_class):
    m = ev.single_label_metrics(three_class)
    y, pred = three_class.targets, three_class.predicted
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["loss"] == pytest.approx(np.mean(-np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.4])))
    assert "top5_accuracy" not in m
    assert m["per_class"]["cat"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["deer"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["dog"]["recall"] == pytest.approx(0.5)
    assert ev.metrics(three_class) == m
    json.dumps(m, allow_nan=False)


def test_top5_accuracy_with_many_classes():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(8), size=50)
    targets = rng.integers(0, 8, 50)
    p = single(probs, targets, classes=[f"k{j}" for j in range(8)])
    rank = (probs > probs[np.arange(50), targets][:, None]).sum(axis=1)
    assert ev.single_label_metrics(p)["top5_accuracy"] == pytest.approx((rank < 5).mean())


def test_metrics_tolerate_a_class_absent_from_validation():
    p = single([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]], [0, 1])
    m = ev.single_label_metrics(p)
    assert m["balanced_accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert m["per_class"]["dog"]["support"] == 0


# --- confusion and error analysis --------------------------------------------------------------


def test_confusion(three_class):
    cm = ev.confusion(three_class)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    np.testing.assert_array_equal(cm, skm.confusion_matrix(three_class.targets, three_class.predicted))
    p = single([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], [0, 1])  # no "dog" images
    norm = ev.confusion_normalized(p)
    assert norm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_multilabel_confusion():
    p = multi(np.where(Y_PRED == 1, 0.9, 0.1), Y_TRUE)
    np.testing.assert_array_equal(ev.multilabel_confusion(p), skm.multilabel_confusion_matrix(Y_TRUE, Y_PRED))
    with pytest.raises(ValueError):
        ev.confusion(p)


def test_most_confused_order():
    # actual -> predicted: cat->dog x2, deer->cat x1, dog->cat x1, deer->dog x2, cat->cat x1
    targets = [0, 0, 1, 2, 1, 1, 0]
    preds = [2, 2, 0, 0, 2, 2, 0]
    probs = np.eye(3)[preds] * 0.8 + 0.2 / 3
    p = single(probs, targets)
    assert ev.most_confused(p) == [("cat", "dog", 2), ("deer", "dog", 2), ("deer", "cat", 1), ("dog", "cat", 1)]
    assert ev.most_confused(p, min_count=2) == [("cat", "dog", 2), ("deer", "dog", 2)]


def test_most_confused_multi_label_counts_missed_and_spurious_pairs():
    # row 0 misses c3; row 1 adds c1; row 4 adds c2: no (missed, added) pair in the same image
    p = multi(np.where(Y_PRED == 1, 0.9, 0.1), Y_TRUE)
    assert ev.most_confused(p) == []
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    decisions = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 1]])
    p = multi(np.where(decisions == 1, 0.9, 0.1), targets)
    assert ev.most_confused(p) == [("c0", "c1", 2), ("c0", "c2", 1), ("c1", "c2", 1)]


def test_top_losses_order_is_stable():
    # losses: -log of target prob 0.5, 0.2, 0.5, 0.9, 0.2
    probs = [[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.5, 0.0, 0.5], [0.9, 0.1, 0.0], [0.2, 0.0, 0.8]]
    p = single(probs, [0, 0, 0, 0, 0])
    assert ev.top_losses(p, 3) == [1, 4, 0]
    assert ev.top_losses(p) == [1, 4, 0, 2, 3]


def test_confused_ranks_wrong_images_of_actual_by_probability_of_predicted():
    probs = [
        [0.2, 0.7, 0.1],  # cat predicted deer, deer 0.7
        [0.6, 0.3, 0.1],  # cat predicted cat: excluded
        [0.1, 0.4, 0.5],  # cat predicted dog, deer 0.4
        [0.1, 0.8, 0.1],  # deer: excluded (wrong actual)
        [0.05, 0.9, 0.05],  # cat predicted deer, deer 0.9
        [0.3, 0.3, 0.4],  # cat predicted dog, deer 0.3
    ]
    p = single(probs, [0, 0, 0, 1, 0, 0])
    assert ev.confused(p, "cat", "deer") == [4, 0, 2, 5]
    assert ev.confused(p, "cat", "deer", k=2) == [4, 0]
    assert ev.confused(p, 0, 2) == [2, 5, 0, 4]
    with pytest.raises(ValueError):
        ev.confused(p, "cow", "deer")


def test_most_confident_wrong():
    probs = [[0.2, 0.7, 0.1], [0.1, 0.4, 0.5], [0.05, 0.9, 0.05], [0.8, 0.1, 0.1], [0.9, 0.05, 0.05]]
    p = single(probs, [0, 0, 0, 1, 2])
    assert ev.most_confident_wrong(p, 2) == {"cat": [2, 0], "deer": [3], "dog": [4]}
    pm = multi([[0.9, 0.2], [0.4, 0.95], [0.3, 0.1]], [[0, 0], [1, 0], [1, 0]])
    # c0 wrong on all three: fp 0.9, fn 1-0.4=0.6, fn 1-0.3=0.7; c1 wrong on row 1 (fp 0.95)
    assert ev.most_confident_wrong(pm, 5) == {"c0": [0, 2, 1], "c1": [1]}


# --- curves and calibration --------------------------------------------------------------------


def test_pr_and_roc_match_sklearn_single_label():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=40)
    targets = rng.integers(0, 3, 40)  # class 3 never occurs
    p = single(probs, targets, classes=["a", "b", "c", "d"])
    pr, roc = ev.pr_curves(p), ev.roc_curves(p)
    for j, c in enumerate("abc"):
        y = targets == j
        assert pr[c]["ap"] == pytest.approx(skm.average_precision_score(y, probs[:, j]))
        assert roc[c]["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, j]))
        precision, recall, _ = skm.precision_recall_curve(y, probs[:, j])
        np.testing.assert_allclose(pr[c]["precision"], precision)
        np.testing.assert_allclose(pr[c]["recall"], recall)
    assert math.isnan(pr["d"]["ap"]) and pr["d"]["precision"] == []
    assert math.isnan(roc["d"]["auc"]) and roc["d"]["fpr"] == []


def test_pr_and_roc_multi_label_skip_degenerate_classes():
    rng = np.random.default_rng(3)
    probs = rng.uniform(size=(30, 3))
    targets = (rng.uniform(size=(30, 3)) < 0.4).astype(int)
    targets[:, 1] = 1  # no negatives: AUC undefined, AP defined
    targets[:, 2] = 0  # no positives: both undefined
    p = multi(probs, targets)
    pr, roc = ev.pr_curves(p), ev.roc_curves(p)
    assert pr["c0"]["ap"] == pytest.approx(skm.average_precision_score(targets[:, 0], probs[:, 0]))
    assert roc["c0"]["auc"] == pytest.approx(skm.roc_auc_score(targets[:, 0], probs[:, 0]))
    assert pr["c1"]["ap"] == pytest.approx(1.0)
    assert math.isnan(roc["c1"]["auc"]) and math.isnan(roc["c2"]["auc"]) and math.isnan(pr["c2"]["ap"])


def test_calibration_single_label_by_hand():
    probs = [[0.9, 0.1], [0.95, 0.05], [0.3, 0.7], [0.65, 0.35], [0.55, 0.45]]
    p = single(probs, [0, 1, 1, 1, 0], classes=["a", "b"])
    cal = ev.calibration(p, n_bins=5)
    # bins (0.4,0.6]: 0.55 right; (0.6,0.8]: 0.7 right, 0.65 wrong; (0.8,1]: 0.9 right, 0.95 wrong
    assert cal["counts"] == [0, 0, 1, 2, 2]
    assert cal["accuracy"][2:] == [1.0, 0.5, 0.5]
    np.testing.assert_allclose(cal["confidence"][2:], [0.55, 0.675, 0.925])
    assert math.isnan(cal["accuracy"][0])
    # 1/5 * 0.45 + 2/5 * 0.175 + 2/5 * 0.425
    assert cal["ece"] == pytest.approx(0.33)
    np.testing.assert_allclose(cal["bin_edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_calibration_multi_label_uses_every_label():
    p = multi([[0.1, 0.9], [0.3, 0.7]], [[0, 1], [1, 1]])
    cal = ev.calibration(p, n_bins=2)
    # bin [0,0.5]: 0.1 (label 0), 0.3 (label 1) -> acc 0.5, conf 0.2; bin (0.5,1]: 0.9, 0.7 both 1 -> 1 vs 0.8
    assert cal["counts"] == [2, 2]
    assert cal["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)


# --- threshold search --------------------------------------------------------------------------


def separable(n: int, c: int, lo: float, hi: float, seed: int, rate: float = 0.4):
    """Labels with positives' probabilities in [hi, 1] and negatives' in [0, lo]."""
    rng = np.random.default_rng(seed)
    targets = (rng.uniform(size=(n, c)) < rate).astype(int)
    probs = np.where(targets == 1, rng.uniform(hi, 1, (n, c)), rng.uniform(0, lo, (n, c)))
    return probs, targets


def test_threshold_search_finds_the_gap_and_prefers_its_middle():
    probs, targets = separable(300, 3, 0.4, 0.6, seed=0)
    # a few ambiguous labels that leave only (0.48, 0.52] perfect
    probs[0, 0], targets[0, 0] = 0.52, 1
    probs[1, 1], targets[1, 1] = 0.55, 1
    probs[2, 2], targets[2, 2] = 0.48, 0
    s = ev.search_thresholds(probs, targets, metric="zero_one")
    assert s.global_threshold == pytest.approx(0.50)
    assert s.global_score == 1.0
    assert len(s.grid) == len(s.global_curve) == 91
    # same picture with the gap at (0.2, 0.3]: the middle of the plateau, not its edge
    probs, targets = separable(300, 3, 0.2, 0.3, seed=1)
    for metric in ev.THRESHOLD_METRICS:
        s = ev.search_thresholds(probs, targets, metric=metric)
        assert s.global_threshold == pytest.approx(0.25, abs=0.011), metric
        assert s.kept == "global"  # nothing to gain per class
        assert s.heldout_global is not None and "margin" in s.reason
        np.testing.assert_allclose(s.thresholds, [s.global_threshold] * 3)


def test_threshold_curves_agree_with_decision_level_metrics():
    rng = np.random.default_rng(4)
    targets = (rng.uniform(size=(120, 4)) < 0.3).astype(int)
    probs = np.clip(targets * 0.3 + rng.uniform(0, 0.7, targets.shape), 0, 1)
    grid = np.linspace(0.05, 0.95, 19)
    for metric, fn in [
        ("zero_one", ev.zero_one_accuracy),
        ("hamming", ev.hamming_accuracy),
        ("f1_macro", ev.f1_macro_multilabel),
    ]:
        s = ev.search_thresholds(probs, targets, metric=metric, grid=grid, n_repeats=1)
        expected = [fn(targets, probs >= t) for t in s.grid]
        np.testing.assert_allclose(s.global_curve, expected, err_msg=metric)
        assert s.global_score == pytest.approx(max(expected))
        assert s.per_class_score >= s.global_score - 1e-12  # per-class search starts no worse
        assert s.per_class_score == pytest.approx(fn(targets, probs >= np.array(s.per_class_thresholds)))
        for j, curve in enumerate(s.per_class_curves):
            t = np.array(s.per_class_thresholds)
            i = s.grid.index(t[j])
            if metric == "hamming":
                expect = [((probs[:, j] >= g) == targets[:, j]).mean() for g in s.grid]
                np.testing.assert_allclose(curve, expect)
            elif metric == "f1_macro":
                assert curve[i] == pytest.approx(skm.f1_score(targets[:, j], probs[:, j] >= t[j]))
            else:  # with the other classes at their thresholds, the curve is exact-match accuracy
                assert curve[i] == pytest.approx(s.per_class_score)
                assert max(curve) == pytest.approx(curve[i])


def test_threshold_search_keeps_per_class_thresholds_when_they_clearly_differ():
    rng = np.random.default_rng(5)
    n, centres = 600, np.array([0.2, 0.5, 0.8])
    targets = (rng.uniform(size=(n, 3)) < 0.4).astype(int)
    pos = rng.uniform(centres + 0.03, np.minimum(centres + 0.2, 1), (n, 3))
    neg = rng.uniform(np.maximum(centres - 0.2, 0), centres - 0.03, (n, 3))
    probs = np.where(targets == 1, pos, neg)
    for metric in ev.THRESHOLD_METRICS:
        s = ev.search_thresholds(probs, targets, metric=metric, classes=["a", "b", "c"])
        assert s.kept == "per_class", (metric, s.reason)
        assert s.heldout_per_class > s.heldout_global + 0.01
        np.testing.assert_allclose(s.thresholds, centres, atol=0.03)
        assert s.per_class_score == 1.0
        assert "per-class" in s.reason
    json.dumps(s.to_dict(), allow_nan=False)


def test_threshold_search_keeps_global_on_a_tiny_validation_set():
    rng = np.random.default_rng(6)
    centres = np.array([0.2, 0.5, 0.8])
    targets = (rng.uniform(size=(12, 3)) < 0.4).astype(int)
    probs = np.where(targets == 1, centres + 0.1, centres - 0.1)
    s = ev.search_thresholds(probs, targets, classes=["a", "b", "c"])
    assert s.kept == "global"
    assert s.heldout_global is None and s.heldout_per_class is None
    assert "at least 10" in s.reason and "class '" in s.reason
    assert s.per_class_score > s.global_score  # tempting, but not trusted
    np.testing.assert_allclose(s.thresholds, [s.global_threshold] * 3)


def test_threshold_search_rejects_bad_input():
    with pytest.raises(ValueError):
        ev.search_thresholds(np.zeros((3, 2)), np.zeros((3, 2)), metric="accuracy")
    with pytest.raises(ValueError):
        ev.search_thresholds(np.zeros((3, 2)), np.zeros(3))


# --- predictions.csv ---------------------------------------------------------------------------


def test_predictions_csv_round_trip_single_label(tmp_path):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(3), size=20).astype(np.float32)
    targets = rng.integers(0, 3, 20)
    paths = [f"folder, with comma/img {i}.jpg" for i in range(20)]
    p = Predictions(paths, ["cat", "deer", "sea lion"], probs, targets)
    out = tmp_path / "predictions.csv"
    p.to_csv(out)
    assert not (tmp_path / "predictions.csv.tmp").exists()
    header = out.read_text().splitlines()[0]
    assert header == "path,target,predicted,prob_cat,prob_deer,prob_sea lion,loss"
    q = Predictions.from_csv(out)
    assert not q.multi_label
    assert q.paths == paths and q.classes == p.classes
    np.testing.assert_array_equal(q.targets, targets)
    np.testing.assert_array_equal(q.probs.astype(np.float32), probs)  # exact in the original dtype
    np.testing.assert_allclose(q.losses, p.losses, rtol=1e-6)
    rows = p.to_rows()
    assert rows[0]["target"] == p.classes[targets[0]] and rows[0]["path"] == paths[0]
    assert set(rows[0]) == {"path", "target", "predicted", "prob_cat", "prob_deer", "prob_sea lion", "loss"}


def test_predictions_csv_round_trip_multi_label(tmp_path):
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.3, 0.2], [0.6, 0.6, 0.6]])
    targets = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    p = multi(probs, targets, classes=["sky", "tree", "water"], thresholds=[0.5, 0.5, 0.65])
    out = tmp_path / "predictions.csv"
    p.to_csv(out)
    rows = p.to_rows()
    assert [r["target"] for r in rows] == ["sky water", "", "tree"]
    assert [r["predicted"] for r in rows] == ["sky water", "", "sky tree"]
    q = Predictions.from_csv(out, thresholds=[0.5, 0.5, 0.65])  # task inferred from the label sets
    assert q.multi_label
    np.testing.assert_array_equal(q.targets, targets)
    np.testing.assert_array_equal(q.probs, probs)
    np.testing.assert_array_equal(q.predicted, p.predicted)
    bad = multi(probs, targets, classes=["sky", "big tree", "water"])
    with pytest.raises(ValueError):
        bad.to_csv(tmp_path / "bad.csv")


# --- label issues ------------------------------------------------------------------------------


def test_label_issues_finds_planted_flips():
    rng = np.random.default_rng(8)
    n, c = 300, 4
    true = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # plant flips on images the model is confident about, so they are findable
    confident = np.flatnonzero(probs[np.arange(n), true] > 0.9)
    flipped = rng.choice(confident, 6, replace=False)
    given = true.copy()
    given[flipped] = (true[flipped] + 1 + rng.integers(0, c - 1, 6)) % c
    classes = ["a", "b", "c", "d"]
    issues = ev.label_issues(probs, given, classes)
    top = issues[: len(flipped)]
    assert {r["index"] for r in top} == set(flipped.tolist())
    for r in top:
        assert r["suggested"] == classes[true[r["index"]]]
        assert r["given"] == classes[given[r["index"]]]
    scores = [r["score"] for r in issues]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_label_issues_none_when_labels_agree():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1]])
    assert ev.label_issues(probs, np.array([0, 1, 0]), ["a", "b"]) == []
