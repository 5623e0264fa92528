"""Suspected label errors: ranking synthetic probabilities with known errors, files and the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from imgclf import evaluation
from imgclf.commands import train as train_cmd
from imgclf.errors import ImgclfError
from imgclf.commands.label_issues import FILENAME, find_label_issues, predictions_file, read_label_issues

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def _noisy_predictions(n: int = 400, n_flipped: int = 20, seed: int = 0):
    """Probabilities of a decent model on the true labels, with some given labels flipped.

    Clean images get 55-95% on their true class; a fifth of them are hard cases whose second
    class gets nearly as much. Flipped images keep the model's view of their true class, so
    their given label has low probability.
    """
    rng = np.random.default_rng(seed)
    c = len(CLASSES)
    true = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n) * 0.1
    conf = rng.uniform(0.55, 0.95, n)
    probs[np.arange(n), true] += conf
    hard = rng.random(n) < 0.2
    runner_up = (true + 1 + rng.integers(0, c - 1, n)) % c
    probs[hard, runner_up[hard]] += conf[hard] * 0.8
    probs /= probs.sum(1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(n, n_flipped, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, c, n_flipped)) % c
    paths = [f"/data/{CLASSES[given[i]]}/img_{i:04d}.jpg" for i in range(n)]
    return evaluation.Predictions(paths, CLASSES, probs, given), set(flipped.tolist()), true


def test_ranking_puts_the_flipped_labels_first(tmp_path):
    preds, flipped, true = _noisy_predictions()
    preds.to_csv(tmp_path / "predictions.csv")
    issues = find_label_issues(tmp_path)
    top = issues.top(0.05)  # 5% of 400 = the 20 flipped
    assert len(top) == 20
    found = {int(r["path"][-8:-4]) for r in top}
    assert found == flipped  # precision and recall 1
    for r in top:
        i = int(r["path"][-8:-4])
        assert r["given"] == CLASSES[preds.targets[i]]
        assert r["suggested"] == CLASSES[true[i]]
        assert 0 < r["score"] <= 1 and r["suggested_prob"] > r["given_prob"]
    assert [r["rank"] for r in issues.rows] == list(range(1, len(issues.rows) + 1))
    scores = [r["score"] for r in issues.rows]
    assert scores == sorted(scores, reverse=True)
    strict = {r["index"] for r in evaluation.label_issues(preds.probs, preds.targets, CLASSES)}
    assert {int(r["path"][-8:-4]) for r in issues.rows if r["confident"]} == strict
    # Every image whose given label is not the most probable one is listed, and no other.
    disagree = {i for i in range(400) if preds.probs[i].argmax() != preds.targets[i]}
    assert {int(r["path"][-8:-4]) for r in issues.rows} == disagree


def test_strict_confident_learning_alone_would_miss_some_flips():
    """Why the second tier exists: the same data through evaluation.label_issues alone."""
    preds, flipped, _ = _noisy_predictions()
    strict = evaluation.label_issues(preds.probs, preds.targets, preds.classes)
    assert len({r["index"] for r in strict} & flipped) < len(flipped)


def test_csv_round_trip_and_nothing_relabelled(tmp_path):
    preds, _, _ = _noisy_predictions(n=120, n_flipped=6, seed=1)
    preds.to_csv(tmp_path / "predictions.csv")
    original = (tmp_path / "predictions.csv").read_text()
    issues = find_label_issues(tmp_path / "predictions.csv")
    assert issues.csv_path == tmp_path / FILENAME
    rows = read_label_issues(issues.csv_path)
    assert [r["path"] for r in rows] == [r["path"] for r in issues.rows]
    assert rows[0]["score"] == pytest.approx(issues.rows[0]["score"], rel=1e-5)
    assert list(rows[0]) == ["rank", "path", "given", "suggested", "score", "given_prob",
                             "suggested_prob", "confident"]
    assert [r["confident"] for r in rows] == [r["confident"] for r in issues.rows]
    assert (tmp_path / "predictions.csv").read_text() == original


def test_out_of_fold_predictions_are_preferred_and_keep_the_fold(tmp_path):
    preds, flipped, _ = _noisy_predictions(n=100, n_flipped=5, seed=2)
    preds.to_csv(tmp_path / "predictions.csv")  # a stray file must not win over the OOF one
    with open(tmp_path / "oof_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "fold", "target", "predicted", *[f"prob_{c}" for c in CLASSES], "loss"])
        for i, row in enumerate(preds.to_rows()):
            w.writerow([row["path"], i % 4, row["target"], row["predicted"],
                        *(row[f"prob_{c}"] for c in CLASSES), row["loss"]])
    assert predictions_file(tmp_path).name == "oof_predictions.csv"
    issues = find_label_issues(tmp_path)
    assert all(r["fold"] == int(r["path"][-8:-4]) % 4 for r in issues.rows)
    assert read_label_issues(issues.csv_path)[0]["fold"] == issues.rows[0]["fold"]


def test_clear_errors(tmp_path):
    with pytest.raises(ImgclfError, match="no oof_predictions.csv or predictions.csv"):
        find_label_issues(tmp_path)
    multi = evaluation.Predictions(["a.jpg", "b.jpg"], ["x", "y"], np.array([[0.9, 0.8], [0.1, 0.2]]),
                                   np.array([[1, 1], [0, 0]]), multi_label=True)
    multi.to_csv(tmp_path / "predictions.csv")
    with pytest.raises(ImgclfError, match="single-label predictions only"):
        find_label_issues(tmp_path)


def test_cli_on_a_run_writes_the_csv_and_refreshes_the_report(tiny_run, tmp_path, monkeypatch):
    import shutil

    from imgclf.cli import app

    run_dir = tmp_path / "run"  # a copy: the shared run stays as other tests expect it
    shutil.copytree(tiny_run.path, run_dir)
    refreshed = []
    monkeypatch.setattr(train_cmd, "write_report", lambda folder: refreshed.append(folder))
    result = CliRunner().invoke(app, ["label-issues", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = read_label_issues(run_dir / FILENAME)
    valid = evaluation.Predictions.from_csv(run_dir / "predictions.csv")
    assert {r["path"] for r in rows} <= set(valid.paths)
    wrong = int((valid.probs.argmax(1) != valid.targets).sum())
    assert len(rows) == wrong
    assert "suspected label errors among" in result.output
    assert refreshed == [run_dir]
