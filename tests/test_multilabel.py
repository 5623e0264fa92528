"""Multi-label end to end: CSV data -> training -> tuned thresholds -> metrics, bundle, predict.

Metric and threshold-search arithmetic is tested in test_evaluation.py and CSV parsing in
test_sources.py; this file checks that the pieces are wired together: what the run directory,
`imgclf predict` and `imgclf evaluate` produce for a multi-label model, and that they agree.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
import zlib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imgclf import evaluation
from imgclf.training.augment import MixBatch
from imgclf.data.sources import from_csv
from imgclf.training.task import Task

CLASSES = ("blue", "green", "red")
COLORS = {"red": (210, 30, 30), "green": (30, 190, 50), "blue": (30, 50, 210)}
TINY_FLAGS = ["--model", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "2",
              "--freeze-epochs", "0", "--lr", "0.01", "--batch-size", "8", "--seed", "0"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Result:
    """Exit code and output of one command line run."""

    returncode: int
    stdout: str
    stderr: str


def imgclf(*args) -> Result:
    """Run the command line in this process (a subprocess would re-import torch each time)."""
    from imgclf import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err), \
            mock.patch.object(sys, "argv", ["imgclf", *map(str, args)]):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return Result(code, out.getvalue(), err.getvalue())


def make_multilabel_images(root: Path, copies: int = 6, size: int = 40) -> list[tuple[str, tuple[str, ...]]]:
    """Grey noisy images with one horizontal band per label, in the label's colour.

    Every subset of CLASSES (the empty set included) appears `copies` times, so the data has
    images with no label, one label and several labels.
    """
    rows = []
    subsets = [s for k in range(len(CLASSES) + 1) for s in itertools.combinations(CLASSES, k)]
    band = size // len(CLASSES)
    for i, labels in enumerate(subsets * copies):
        rng = np.random.default_rng(zlib.crc32(f"ml/{i}".encode()))
        pixels = np.clip(128 + rng.normal(0, 20, (size, size, 3)), 0, 255)
        for lab in labels:
            k = CLASSES.index(lab)
            pixels[k * band:(k + 1) * band] = np.clip(
                np.array(COLORS[lab]) + rng.normal(0, 20, (band, size, 3)), 0, 255)
        name = f"img_{i:03d}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / name, quality=92)
        rows.append((name, labels))
    return rows


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory) -> Path:
    """images/ with labels.csv (space-delimited) and onehot.csv (a 0/1 column per class)."""
    root = tmp_path_factory.mktemp("multilabel")
    rows = make_multilabel_images(root)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "labels"])
        w.writerows((name, " ".join(labels)) for name, labels in rows)
    with open(root / "onehot.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", *CLASSES])
        w.writerows((name, *(int(c in labels) for c in CLASSES)) for name, labels in rows)
    return root


@pytest.fixture(scope="module")
def ml_run(ml_data, tmp_path_factory):
    """One CLI training run on the space-delimited CSV (multi-label is detected, not forced)."""
    out = tmp_path_factory.mktemp("ml-runs")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the autouse cache fixture
        mp.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))
        r = imgclf("train", ml_data / "images", "--csv", ml_data / "labels.csv", *TINY_FLAGS,
                   "--out", out, "--name", "ml")
    assert r.returncode == 0, r.stderr
    return out / "ml", r


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _label_sets(stdout: str) -> dict[str, str]:
    """{path: "a b"} from `imgclf predict` lines: path<TAB>{a, b}<TAB>top-k."""
    out = {}
    for line in stdout.strip().splitlines():
        path, labels, _ = line.split("\t")
        assert labels.startswith("{") and labels.endswith("}")
        out[path] = " ".join(x.strip() for x in labels[1:-1].split(",") if x.strip())
    return out


def test_train_detects_multi_label_and_reports_the_threshold_choice(ml_run):
    run, r = ml_run
    assert "multi-label detected" in r.stderr and "multi-label" in r.stderr
    assert "(no label)" in r.stderr  # images with an empty label set are counted, not dropped
    assert "Decision thresholds maximising validation exact-match accuracy" in r.stderr
    assert "Kept " in r.stderr and "Traceback" not in r.stderr
    search = json.loads((run / "thresholds.json").read_text())
    assert search["metric"] == "zero_one" and search["kept"] in ("global", "per_class")
    assert (run / "plots" / "threshold_curves.png").stat().st_size > 0


def test_metrics_json_is_at_the_tuned_thresholds(ml_run):
    run, _ = ml_run
    m = _metrics(run)
    search = json.loads((run / "thresholds.json").read_text())
    for key in ["valid_hamming_accuracy", "valid_zero_one_accuracy", "valid_f1_macro",
                "valid_f1_micro", "valid_map", "threshold", "thresholds", "threshold_kept",
                "threshold_reason", "per_class_thresholds_candidate", "valid_at_threshold_0.5"]:
        assert key in m, key
    assert m["task"] == "multi_label" and m["classes"] == list(CLASSES)
    assert m["threshold"] == search["global_threshold"]
    assert list(m["thresholds"].values()) == search["thresholds"]
    assert set(m["valid_per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1", "ap", "support"} <= set(m["valid_per_class"]["red"])

    preds = evaluation.Predictions.from_csv(run / "predictions.csv", multi_label=True,
                                            thresholds=np.array(search["thresholds"]))
    tuned = evaluation.multi_label_metrics(preds)
    for k in ["hamming_accuracy", "zero_one_accuracy", "f1_macro", "f1_micro", "map"]:
        assert m[f"valid_{k}"] == pytest.approx(tuned[k]), k
    at_half = evaluation.multi_label_metrics(preds, thresholds=0.5)
    assert m["valid_at_threshold_0.5"]["zero_one_accuracy"] == pytest.approx(
        at_half["zero_one_accuracy"])
    # the tuned threshold maximises exact match on these very predictions
    assert tuned["zero_one_accuracy"] >= at_half["zero_one_accuracy"]


def test_predictions_csv_has_probabilities_and_label_sets(ml_run, ml_data):
    run, _ = ml_run
    rows = _csv_rows(run / "predictions.csv")
    thresholds = _metrics(run)["thresholds"]
    truth = {r["filename"]: r["labels"] for r in _csv_rows(ml_data / "labels.csv")}
    assert list(rows[0]) == ["path", "target", "predicted", *(f"prob_{c}" for c in CLASSES), "loss"]
    assert len(rows) == _metrics(run)["valid_images"]
    for r in rows:
        assert r["target"] == truth[Path(r["path"]).name]
        chosen = [c for c in CLASSES if float(r[f"prob_{c}"]) >= thresholds[c]]
        assert r["predicted"] == " ".join(chosen)


def test_bundle_stores_the_thresholds_and_predict_applies_them(ml_run, tmp_path):
    run, _ = ml_run
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["task"] == "multi_label"
    assert meta["thresholds"] == list(_metrics(run)["thresholds"].values())
    rows = _csv_rows(run / "predictions.csv")
    out_csv = tmp_path / "p.csv"
    r = imgclf("predict", run, *[row["path"] for row in rows], "--out", out_csv)
    assert r.returncode == 0, r.stderr
    assert "tuned on validation" in r.stderr
    assert _label_sets(r.stdout) == {row["path"]: row["predicted"] for row in rows}
    written = {row["path"]: row["predicted"] for row in _csv_rows(out_csv)}
    assert written == {row["path"]: row["predicted"] for row in rows}


def test_threshold_option_overrides_the_bundle(ml_run, tmp_path):
    run, _ = ml_run
    rows = _csv_rows(run / "predictions.csv")
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    # a threshold between two observed probabilities splits them whatever the model learned
    t = float(np.round(np.median(probs), 6))
    out_csv = tmp_path / "p.csv"
    r = imgclf("predict", run, *[row["path"] for row in rows], "--threshold", t, "--out", out_csv)
    assert r.returncode == 0, r.stderr
    assert "--threshold overrides" in r.stderr
    got = _label_sets(r.stdout)
    for row in _csv_rows(out_csv):
        expected = " ".join(c for c in CLASSES if float(row[f"prob_{c}"]) >= t)
        assert row["predicted"] == expected and got[row["path"]] == expected
    r = imgclf("predict", run, rows[0]["path"], "--threshold", "0")
    assert r.returncode == 0 and _label_sets(r.stdout)[rows[0]["path"]] == " ".join(CLASSES)
    r = imgclf("predict", run, rows[0]["path"], "--threshold", "1.5")
    assert r.returncode == 2 and "not a probability" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_evaluate_prints_per_class_metrics_at_the_bundle_thresholds(ml_run, ml_data, tmp_path):
    run, _ = ml_run
    r = imgclf("evaluate", run)
    assert r.returncode == 0, r.stderr
    assert "zero_one_accuracy=" in r.stderr and "hamming_accuracy=" in r.stderr
    assert "Per class at the bundle's thresholds" in r.stderr and "threshold" in r.stderr
    ev = json.loads((run / "evaluation.json").read_text())
    m = _metrics(run)
    assert ev["zero_one_accuracy"] == pytest.approx(m["valid_zero_one_accuracy"], abs=1e-6)
    assert ev["thresholds"] == pytest.approx(list(m["thresholds"].values()))
    # another labelled set, in the one-hot format
    r = imgclf("evaluate", run, ml_data / "images", "--csv", ml_data / "onehot.csv",
               "--label-cols", "auto", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["n_samples"] == len(list((ml_data / "images").glob("*.jpg")))
    pred_rows = _csv_rows(tmp_path / "ev" / "predictions.csv")
    assert sum(row["target"] == "" for row in pred_rows) == 6  # the empty label sets are kept


def test_bad_threshold_metric_fails_before_training(ml_data, tmp_path):
    r = imgclf("train", ml_data / "images", "--csv", ml_data / "labels.csv", *TINY_FLAGS,
               "--threshold-metric", "accuracy", "--out", tmp_path)
    assert r.returncode == 2
    assert "--threshold-metric 'accuracy' is not one of zero_one | hamming | f1_macro" in r.stderr
    assert not any(tmp_path.iterdir())  # no run directory was started


def test_forced_multi_label_on_single_label_rows(ml_data, tmp_path):
    rows = _csv_rows(ml_data / "labels.csv")
    single = [(r["filename"], r["labels"].split()[0]) for r in rows if len(r["labels"].split()) == 1]
    with open(tmp_path / "one.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "labels"), *single])
    assert not from_csv(ml_data / "images", tmp_path / "one.csv").multi_label
    forced = from_csv(ml_data / "images", tmp_path / "one.csv", multi_label=True)
    assert forced.multi_label and forced.classes == sorted(CLASSES)


def test_mixup_on_multi_hot_targets_trains_with_bce():
    """MixBatch's mixed multi-hot rows go straight into Task.loss; BCE is linear in the target,
    so the loss of a mixed target is the same mix of the two images' losses."""
    task = Task(CLASSES, multi_label=True)
    y = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    _, t = MixBatch(num_classes=3, multi_label=True, mixup=0.4, seed=0)(torch.zeros(4, 3, 8, 8), y)
    assert t.shape == y.shape and not torch.equal(t, y)
    by_hand = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).mean()
    assert float(task.loss(logits, t)) == pytest.approx(float(by_hand), rel=1e-6)
    lam, other = 0.3, y.flip(0)
    mixed = task.loss(logits, lam * y + (1 - lam) * other)
    assert float(mixed) == pytest.approx(
        float(lam * task.loss(logits, y) + (1 - lam) * task.loss(logits, other)), rel=1e-6)
    assert torch.allclose(task.activate(logits), torch.sigmoid(logits))


@pytest.mark.slow
def test_threshold_curves_plot(tmp_path):
    from imgclf.report import plots

    rng = np.random.default_rng(0)
    targets = rng.random((60, 3)) < 0.5
    probs = np.clip(targets * 0.6 + rng.random((60, 3)) * 0.4, 0, 1)
    search = evaluation.search_thresholds(probs, targets, metric="hamming")
    fig = plots.threshold_curves(search, list(CLASSES))
    titled = [ax.get_title() for ax in fig.axes if ax.axison]
    assert len(titled) == 1 + len(CLASSES)
    assert titled[1].startswith("blue: t = ")
    path = plots.save(fig, tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the JSON form (thresholds.json) draws the same
    assert len([ax for ax in plots.threshold_curves(search.to_dict()).axes if ax.axison]) == 4


@pytest.mark.integration
def test_real_multilabel_fridge_source():
    data = SHARED / "data" / "multilabelFridgeObjects"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    table = from_csv(data / "images", data / "labels.csv", valid_pct=0.2, seed=0)
    assert table.multi_label and table.classes == ["can", "carton", "milk_bottle", "water_bottle"]
    assert len(table.samples) == 128
    assert any(len(s.labels) == 4 for s in table.samples)
