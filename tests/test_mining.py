"""Hard negative mining on generated images: selection, resume, stopping rules, user files."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.commands import mine as mining
from imgclf.commands.mine import pool as mining_pool
from imgclf.training import fine_tune, models
from imgclf.errors import ImgclfError

GRAYS = (20, 128, 235)


def make_pool(root: Path, n: int = 16, size: int = 40) -> Path:
    """Noisy grey, black and white JPEGs: clearly none of the red/green/blue classes."""
    for i in range(n):
        rng = np.random.default_rng(zlib.crc32(f"pool/{i}".encode()))
        level = GRAYS[i % len(GRAYS)]
        pixels = np.clip(level + rng.normal(0, 25, (size, size, 1)), 0, 255).repeat(3, axis=2)
        path = root / f"clutter_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
    return root


def snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    """Every file under the folders with its content hash and modification time."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def reports(request, monkeypatch) -> list:
    """Runs whose report mining asked for; only tests that use the `real_report` fixture render
    one (it computes heatmaps, which would dominate these tests' time)."""
    from imgclf.commands import train as train_cmd

    calls: list = []
    if "real_report" not in request.fixturenames:
        monkeypatch.setattr(train_cmd, "write_report", lambda run_dir: calls.append(run_dir))
    return calls


@pytest.fixture
def run_copy(tiny_run, tmp_path: Path) -> Path:
    """A private copy of the shared tiny run (mining rewrites the run's files)."""
    return Path(shutil.copytree(tiny_run.path, tmp_path / "run"))


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return make_pool(tmp_path / "pool")


def manifest(run: Path) -> dict:
    return json.loads((run / "mining" / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Pure rules


def test_split_pool_is_seeded_disjoint_and_independent_of_order():
    paths = [Path(f"/pool/{i:02d}.jpg") for i in range(64)]
    u, v = mining.split_pool(paths, 0.2, seed=42)
    assert len(v) == 13 and len(u) == 51
    assert set(u).isdisjoint(v) and set(u) | set(v) == set(paths)
    assert mining.split_pool(list(reversed(paths)), 0.2, seed=42) == (u, v)
    assert mining.split_pool(paths, 0.2, seed=7)[1] != v
    assert len(mining.split_pool(paths[:2], 0.01, seed=0)[1]) == 1  # never an empty V


def test_false_positives_single_label_ignore_the_negative_column():
    probs = np.array([[0.70, 0.10, 0.20],   # class 0 wins: false positive
                      [0.30, 0.05, 0.65],   # negative (column 2) wins: not a false positive
                      [0.10, 0.50, 0.40]])  # class 1 wins
    predicted, confidence, is_fp = mining.false_positive_scores(probs, negative_index=2)
    assert predicted.tolist() == [0, 0, 1]
    np.testing.assert_allclose(confidence, [0.70, 0.30, 0.50])
    assert is_fp.tolist() == [True, False, True]


def test_false_positives_multi_label_use_the_thresholds():
    probs = np.array([[0.6, 0.1], [0.3, 0.45], [0.2, 0.9]])
    thresholds = np.array([0.5, 0.4])
    predicted, confidence, is_fp = mining.false_positive_scores(probs, thresholds=thresholds)
    assert predicted.tolist() == [0, 1, 1]
    np.testing.assert_allclose(confidence, [0.6, 0.45, 0.9])
    assert is_fp.tolist() == [True, True, True]
    assert mining.false_positive_scores(probs)[2].tolist() == [True, False, True]


def test_top_false_positives_are_the_most_confident_in_order():
    confidence = np.array([0.9, 0.99, 0.5, 0.95, 0.95, 0.2])
    is_fp = np.array([True, False, True, True, True, True])
    assert mining.top_false_positives(confidence, is_fp, 3).tolist() == [3, 4, 0]
    assert mining.top_false_positives(confidence, is_fp, 10).tolist() == [3, 4, 0, 2, 5]
    assert mining.top_false_positives(confidence, np.zeros(6, bool), 3).tolist() == []


def test_better_ranks_overall_accuracy_then_false_positives_then_positives():
    a = {"overall_accuracy": 0.8, "fp_rate_V": 0.5, "positive_accuracy": 0.9}
    assert mining.better(a, None)
    assert mining.better({**a, "overall_accuracy": 0.81}, a)
    assert mining.better({**a, "fp_rate_V": 0.4}, a)
    assert not mining.better(dict(a), a)  # a tie keeps the earlier round
    assert not mining.better({**a, "overall_accuracy": 0.7, "fp_rate_V": 0.0}, a)


def test_grow_classifier_keeps_the_trained_outputs():
    import timm

    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    models.grow_classifier(model)
    after = model(x)
    assert after.shape == (2, 4)
    torch.testing.assert_close(after[:, :3], before)
    # The new class starts at the mean logit: never the top class of an image.
    assert (after.argmax(1) < 3).all()


# ---------------------------------------------------------------------------------------------
# Whole runs (tiny random-init model)


@pytest.fixture
def real_report() -> None:
    """Marks a test that renders the real report.html."""


@pytest.mark.slow
def test_mined_set_is_the_top_confidence_false_positives(run_copy, pool, color_data, real_report):
    from imgclf import api

    before = snapshot(pool, color_data)
    n_orig = len(list(csv.DictReader((run_copy / "metrics.csv").open())))
    # Round 0 without training: the new negative row is the mean of the others, so every pool
    # image is still a false positive and the choice is decided by confidence alone.
    r0 = mining.mine(run_copy, pool, rounds=0, epochs=0, initial=2, per_round=3)
    assert r0.stop_reason == "reached --rounds 0" and [r["round"] for r in r0.rounds] == [0]
    split = json.loads((run_copy / "mining" / "pool.json").read_text())
    assert len(split["valid"]) == 3 and len(split["mining"]) == 13
    seeds = {m["path"] for m in r0.rounds[0]["mined"]}
    assert len(seeds) == 2 and seeds <= set(split["mining"])

    # What the round-0 model (now the run's bundle) calls the rest of U, scored independently.
    bundle = api.load(run_copy)
    assert bundle.classes == ["blue", "green", "red", "negative"]
    rest = [p for p in split["mining"] if p not in seeds]
    probs = bundle.predict(rest).probs
    positive = probs[:, :3]
    assert (probs.argmax(1) != 3).all()
    order = sorted(range(len(rest)), key=lambda i: (-positive[i].max(), i))[:3]

    r1 = mining.mine(run_copy, pool, rounds=1, epochs=0)  # continues with one more round
    assert [r["round"] for r in r1.rounds] == [0, 1]
    mined = r1.rounds[1]["mined"]
    assert [m["path"] for m in mined] == [rest[i] for i in order]
    assert [m["predicted"] for m in mined] == [bundle.classes[positive[i].argmax()] for i in order]
    np.testing.assert_allclose([m["confidence"] for m in mined],
                               [positive[i].max() for i in order], atol=1e-5)
    assert r1.rounds[1]["pool_scored"] == 11 and r1.rounds[1]["pool_false_positives"] == 11

    # User files: same bytes, same times, nothing added next to them.
    assert snapshot(pool, color_data) == before
    # The run: rounds appended to metrics.csv, the report's table, the final validation set.
    rows = list(csv.DictReader((run_copy / "metrics.csv").open()))
    assert len(rows) == n_orig + 2
    assert [r["round"] for r in rows[n_orig:]] == ["0", "1"] and rows[0]["round"] == ""
    assert rows[-1]["fp_rate_V"] != "" and rows[-1]["stage"] == "mining round 1"
    report = json.loads((run_copy / "mining" / "rounds.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert {"fp_rate_V", "positive_accuracy", "overall_accuracy", "n_mined", "mined",
            "confusion"} <= set(report["rounds"][1])
    assert np.asarray(report["rounds"][1]["confusion"]).shape == (4, 4)
    preds = list(csv.DictReader((run_copy / "predictions.csv").open()))
    assert sum(p["target"] == "negative" for p in preds) == 3
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["classes"][-1] == "negative" and "fp_rate_V" in metrics["mining"]["rounds"][0]
    assert (run_copy / "mining" / "original" / "model" / "weights.safetensors").is_file()
    assert (run_copy / "plots" / "mining.png").is_file()
    assert "Hard negative mining" in (run_copy / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_resume_after_an_interrupted_round(run_copy, pool, monkeypatch):
    real = fine_tune.fine_tune
    calls: list[int] = []

    def interrupted_in_round_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fine_tune, "fine_tune", interrupted_in_round_1)
    options = dict(rounds=2, epochs=1, per_round=2, initial=2, patience=5)
    with pytest.raises(KeyboardInterrupt):
        mining.mine(run_copy, pool, **options)
    state = manifest(run_copy)
    assert [r["status"] for r in state["rounds"]] == ["done", "mined"]
    round0, picks1 = state["rounds"][0], state["rounds"][1]["mined"]
    assert not (run_copy / "mining" / "rounds.json").exists()
    assert json.loads((run_copy / "model" / "model.json").read_text())["num_classes"] == 3

    calls.clear()
    monkeypatch.setattr(fine_tune, "fine_tune",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ImgclfError, match="pool"):
        mining.mine(run_copy, pool.parent, **options)  # another pool cannot continue this one
    result = mining.mine(run_copy, pool, resume=True, **options)
    assert len(calls) == 2  # rounds 1 and 2; round 0 is not trained again
    state = manifest(run_copy)
    assert state["rounds"][0] == round0 and state["rounds"][1]["mined"] == picks1
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert result.stop_reason == "reached --rounds 2" and state["finished"]
    kept = state["rounds"][result.best_round]["weights"]
    assert (run_copy / "mining" / kept).is_file()
    negatives = [m["path"] for r in state["rounds"] for m in r["mined"]]
    assert len(set(negatives)) == len(negatives) == 6  # no image is mined twice
    # Rerunning a finished mining does nothing.
    again = mining.mine(run_copy, pool, **options)
    assert len(calls) == 2 and again.rounds == result.rounds


def test_stops_when_the_validation_score_stops_improving(run_copy, pool):
    # Without training the model never changes, so round 1 cannot beat round 0.
    result = mining.mine(run_copy, pool, rounds=5, epochs=0, patience=1, per_round=2)
    assert [r["round"] for r in result.rounds] == [0, 1]
    assert "patience" in result.stop_reason and result.best_round == 0


def test_stops_when_the_pool_has_no_false_positives(run_copy, pool, monkeypatch):
    real = mining_pool.false_positive_scores

    def all_negative(probs, negative_index=None, thresholds=None):
        predicted, confidence, is_fp = real(probs, negative_index, thresholds)
        return predicted, confidence, np.zeros_like(is_fp)

    monkeypatch.setattr(mining_pool, "false_positive_scores", all_negative)
    result = mining.mine(run_copy, pool, rounds=3, epochs=0)
    assert [r["round"] for r in result.rounds] == [0]
    assert result.stop_reason == "no false positives left in the mining pool"


@pytest.mark.slow
def test_multi_label_negatives_are_empty_label_sets(tmp_path, pool):
    from imgclf import api

    from conftest import TINY

    root = tmp_path / "ml"
    lines = ["image,labels"]
    colors = {"red": (200, 40, 40), "blue": (40, 60, 200)}
    for i in range(30):
        labels = ["red", "blue", "red blue"][i % 3]
        rng = np.random.default_rng(i)
        left = colors[labels.split()[0]]
        right = colors[labels.split()[-1]]
        pixels = np.zeros((40, 40, 3))
        pixels[:, :20], pixels[:, 20:] = left, right
        pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"{i:03d}.jpg")
        lines.append(f"{i:03d}.jpg,{labels}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    run = api.train(root, csv=str(root / "labels.csv"), multi_label=True, out=str(tmp_path),
                    name="ml", seed=0, **TINY)
    result = mining.mine(run.path, pool, rounds=1, epochs=1, per_round=2, initial=2)
    assert json.loads((run.path / "model" / "model.json").read_text())["classes"] == ["blue", "red"]
    state = manifest(run.path)
    assert not state["added_class"] and state["multi_label"]
    assert len(state["rounds"][0]["mined"]) == 2
    preds = list(csv.DictReader((run.path / "predictions.csv").open()))
    assert sum(p["target"] == "" for p in preds) == 3  # V: no label at all
    for r in result.rounds:
        assert 0.0 <= r["fp_rate_V"] <= 1.0
        assert np.asarray(r["confusion"]).shape == (2, 2, 2)


def test_bad_inputs_name_the_fix(run_copy, tmp_path):
    with pytest.raises(ImgclfError, match="--pool"):
        mining.mine(run_copy, tmp_path / "missing")
    with pytest.raises(ImgclfError, match="no mining to resume"):
        mining.mine(run_copy, resume=True)
    with pytest.raises(ImgclfError, match="--per-round"):
        mining.mine(run_copy, tmp_path, per_round=0)
    assert not (run_copy / "mining").exists()


def cli(monkeypatch, *args: str) -> int:
    """Run `imgclf ARGS` in this process (so the test's stubs apply); its exit code."""
    from imgclf import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["imgclf", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    return exit_info.value.code


def test_cli_mine(run_copy, pool, monkeypatch, capsys, reports):
    code = cli(monkeypatch, "mine", run_copy, "--pool", pool, "--rounds", "0", "--epochs", "0",
               "--initial", "1")
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Hard negative mining" in err and "kept: round 0" in err
    assert manifest(run_copy)["options"]["initial"] == 1 and reports == [run_copy]
    code = cli(monkeypatch, "mine", run_copy, "--pool", pool / "elsewhere")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--restart" in err
