"""The Interpretation layer on known predictions, Grad-CAM on a model with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import average_precision_score, multilabel_confusion_matrix, roc_auc_score
from torch import nn

from imgclf.data.transforms import Preprocess
from imgclf.errors import ImgclfError
from imgclf.evaluation import Predictions
from imgclf.report.gradcam import eval_view, grad_cam, heatmaps_for, overlay
from imgclf.report.interpret import Interpretation


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Single-image forward passes gain nothing from threads, and on a busy 2-core machine
    # OpenMP's waiting makes them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Seven images of classes a, b, c. Wrong: #1 a->b, #2 a->c, #4 b->a, #6 a->b (the surest).
TARGETS = [0, 0, 0, 1, 1, 2, 0]
PROBS = [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.1, 0.8, 0.1],
         [0.6, 0.3, 0.1], [0.05, 0.15, 0.8], [0.1, 0.8, 0.1]]


@pytest.fixture
def known(tmp_path) -> Interpretation:
    paths = []
    for i, t in enumerate(TARGETS):
        p = tmp_path / "abc"[t] / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (24, 20), (30 * i, 100, 200)).save(p)
        paths.append(str(p))
    preds = Predictions(paths=paths, classes=["a", "b", "c"], probs=np.array(PROBS),
                        targets=np.array(TARGETS))
    return Interpretation.from_predictions(preds)


def test_confusion_counts_and_rows(known):
    assert known.confusion().tolist() == [[1, 2, 1], [1, 1, 0], [0, 0, 1]]
    norm = known.confusion(normalize=True)
    assert np.allclose(norm[0], [0.25, 0.5, 0.25]) and np.allclose(norm.sum(1), 1)
    cm, fig = known.confusion(plot=True)
    assert cm.sum() == 7 and isinstance(fig, Figure)


def test_most_confused_order(known):
    assert known.most_confused() == [("a", "b", 2), ("a", "c", 1), ("b", "a", 1)]
    assert known.most_confused(min_count=2) == [("a", "b", 2)]
    pairs, fig = known.most_confused(plot=True)
    assert len(pairs) == 3 and isinstance(fig, Figure)


def test_top_losses_order_and_examples(known):
    top = known.top_losses(4)
    # -log p(target): #2 and #6 tie at -log 0.1 (image order kept), then #1 (-log 0.2), #4.
    assert [e.index for e in top] == [2, 6, 1, 4]
    assert top[0].loss == pytest.approx(-math.log(0.1))
    assert top[1].actual == ["a"] and top[1].predicted == ["b"] and not top[1].correct
    assert top[1].prob("b") == pytest.approx(0.8) and top[1].probability == pytest.approx(0.8)
    assert "a → b" in top[1].caption()
    examples, fig = known.top_losses(3, plot=True)
    assert len(examples) == 3 and len(fig.axes) == 3


def test_confused_ranks_by_the_wrong_class(known):
    # The a images predicted wrongly, highest b probability first.
    assert [e.index for e in known.confused("a", "b")] == [6, 1, 2]
    assert [e.index for e in known.confused("a", "b", k=1)] == [6]
    assert known.confused("c", "a") == []


def test_most_confident_wrong_per_class(known):
    out = known.most_confident_wrong(k_per_class=2)
    assert [e.index for e in out["a"]] == [6, 1]
    assert [e.index for e in out["b"]] == [4] and out["c"] == []


def test_pr_and_roc_match_scikit_learn(known):
    y, probs = np.array(TARGETS), np.array(PROBS)
    pr, fig = known.pr_curves(plot=True)
    roc = known.roc_curves()
    for j, c in enumerate("abc"):
        assert pr[c]["ap"] == pytest.approx(average_precision_score(y == j, probs[:, j]))
        assert roc[c]["auc"] == pytest.approx(roc_auc_score(y == j, probs[:, j]))
    assert isinstance(fig, Figure)
    assert isinstance(known.roc_curves(plot=True)[1], Figure)


def test_calibration_hand_made_ece():
    # Two bins: (0, 0.5] holds one wrong image at confidence 0.4; (0.5, 1] three images at mean
    # confidence 0.7667 of which two are right. ECE = 1/4 * 0.4 + 3/4 * |2/3 - 0.7667| = 0.175.
    probs = np.array([[0.4, 0.35, 0.25], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1]])
    preds = Predictions(paths=list("wxyz"), classes=["a", "b", "c"], probs=probs,
                        targets=np.array([1, 0, 1, 0]))
    cal, fig = Interpretation.from_predictions(preds).calibration(n_bins=2, plot=True)
    assert cal["ece"] == pytest.approx(0.175)
    assert cal["counts"] == [1, 3]
    assert isinstance(fig, Figure)


def test_multi_label_confusion_and_thresholds():
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.5).astype(np.int8)
    probs = np.clip(targets * 0.6 + rng.random((40, 3)) * 0.5, 0, 1)
    preds = Predictions(paths=[f"{i}.jpg" for i in range(40)], classes=["x", "y", "z"],
                        probs=probs, targets=targets, multi_label=True, thresholds=[0.5, 0.6, 0.4])
    interp = Interpretation.from_predictions(preds)
    expected = multilabel_confusion_matrix(targets, probs >= [0.5, 0.6, 0.4])
    assert np.array_equal(interp.confusion(), expected)
    cm, fig = interp.confusion(plot=True)
    assert isinstance(fig, Figure)
    search, fig = interp.thresholds(metric="hamming", plot=True)
    assert search["metric"] == "hamming" and len(search["thresholds"]) == 3
    assert isinstance(fig, Figure)
    ex = interp.example(0)
    assert ex.actual == [c for c, t in zip("xyz", targets[0]) if t]
    assert "→" in ex.caption()


def test_single_label_has_no_thresholds(known):
    with pytest.raises(ImgclfError, match="multi-label"):
        known.thresholds()
    with pytest.raises(ImgclfError, match="no model bundle"):
        known.heatmap(0)


# ---------------------------------------------------------------------------------------------
# Grad-CAM


class ColourModel(nn.Module):
    """A classifier whose answer is known: the feature map is the image's colour channels at a
    quarter of the resolution, and class j's score is the mean of channel j."""

    num_features = 3

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3) * 10)
            self.fc.bias.zero_()

    def forward_features(self, x):
        return self.pool(x)

    def forward_head(self, f):
        return self.fc(f.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


PLAIN = Preprocess(size=32, presize=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _red_green(path):
    """Black 32x32 picture: a red square top left, a green square bottom right."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[2:10, 2:10, 0] = 255
    pixels[22:30, 22:30, 1] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_grad_cam_finds_the_evidence(tmp_path):
    model = ColourModel()
    view = eval_view(_red_green(tmp_path / "rg.png"), PLAIN)
    assert view.shape == (3, 32, 32) and view.dtype == np.uint8
    classes, maps, probs = grad_cam(model, view, PLAIN, [0, 1, 2])
    red, green, blue = maps
    assert classes == [0, 1, 2] and red.shape == (32, 32)
    assert np.unravel_index(red.argmax(), red.shape) < (16, 16)  # top left
    assert min(np.unravel_index(green.argmax(), green.shape)) >= 16  # bottom right
    assert red[:16, :16].mean() > 5 * red[16:, 16:].mean()
    assert red.max() == pytest.approx(1.0) and red.min() >= 0
    assert not blue.any()  # no blue anywhere: no evidence, an all-zero map
    x = torch.from_numpy(view)[None].float() / 255
    assert np.allclose(probs, torch.softmax(model(x), -1)[0].detach().numpy(), atol=1e-6)
    # Default: the predicted class; red and green tie, argmax takes the first.
    assert grad_cam(model, view, PLAIN)[0] == [int(np.argmax(probs))]


def test_overlay_and_heatmaps_for(tmp_path):
    path = _red_green(tmp_path / "rg.png")
    maps = heatmaps_for(ColourModel(), path, PLAIN, ["red", "green", "blue"], [1])
    assert [m.class_name for m in maps] == ["green"]
    m = maps[0]
    # Red and green each fill 64 of 1024 pixels: logits 0.625, 0.625, 0.
    expected = math.exp(0.625) / (2 * math.exp(0.625) + 1)
    assert m.view.shape == (32, 32, 3) and m.probability == pytest.approx(expected, rel=1e-4)
    img = m.overlay()
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    changed = np.abs(img.astype(int) - m.view.astype(int)).sum(-1)
    assert changed[24:28, 24:28].mean() > changed[2:6, 26:30].mean()  # hot region changes most
    assert overlay(m.view.transpose(2, 0, 1), m.cam).shape == (32, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["test_vit", "test_mambaout", "test_convnext"])
def test_grad_cam_on_other_layouts(arch):
    """Token (ViT, class-token pooled) and channels-last feature maps give spatial maps too."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    pre = Preprocess(size=64, presize=64)
    view = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    _, maps, probs = grad_cam(model, view, pre, [0, 1])
    assert probs.shape == (3,) and all(m.shape == (64, 64) for m in maps)
    assert all(np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert any(m.max() > 0 for m in maps)


# ---------------------------------------------------------------------------------------------
# From a run and from a bundle


def test_from_run_matches_the_run(tiny_run):
    interp = Interpretation.from_run(tiny_run.path)
    preds = tiny_run.predictions()
    assert interp.predictions.paths == preds.paths
    assert np.allclose(interp.predictions.probs, preds.probs)
    assert interp.history == tiny_run.history() and interp.data_summary["summary"]["classes"]
    assert interp.metrics()["accuracy"] == pytest.approx(tiny_run.metrics()["valid_accuracy"])
    rows, fig = interp.training_curves(plot=True)
    assert rows and isinstance(fig, Figure)


def test_heatmap_from_a_run(tiny_run):
    interp = Interpretation.from_run(tiny_run.path)
    ex = interp.top_losses(1)[0]
    maps, fig = interp.heatmap(ex.index, plot=True)
    names = [m.class_name for m in maps]
    assert names[0] == ex.predicted[0] and set(names) == set(ex.predicted + ex.actual)
    assert maps[0].view.shape == (32, 32, 3) and isinstance(fig, Figure)
    by_path = interp.heatmap(ex.path, classes=[ex.actual[0]])
    assert [m.class_name for m in by_path] == ex.actual
    assert by_path[0].probability == pytest.approx(ex.prob(ex.actual[0]), abs=1e-4)


def test_from_bundle_predicts_labelled_data(tiny_run, color_data):
    interp = Interpretation.from_bundle(tiny_run.path, color_data)
    p = interp.predictions
    assert len(p.paths) == sum(1 for _ in color_data.rglob("*.jpg"))
    assert [p.classes[t] for t in p.targets] == [path.split("/")[-2] for path in p.paths]
    assert interp.metrics()["accuracy"] > 0.5
