"""The command line end to end on generated images with a tiny random-init model."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_FLAGS = ["--model", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "1",
              "--freeze-epochs", "0", "--lr", "0.01", "--batch-size", "8"]


def imgclf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "imgclf.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cli_run(color_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-runs")
    r = imgclf("train", color_data, *TINY_FLAGS, "--out", out, "--name", "cli")
    assert r.returncode == 0, r.stderr
    return out / "cli", r


def test_train_prints_summary_and_paths(cli_run):
    run, r = cli_run
    assert "Run directory" in r.stderr and "Bundle:" in r.stderr
    assert "red" in r.stderr and "green" in r.stderr  # the data summary table
    assert (run / "model" / "model.json").is_file()
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_predict_files_folders_and_csv(cli_run, color_data, tmp_path):
    run, _ = cli_run
    out_csv = tmp_path / "preds.csv"
    r = imgclf("predict", run, color_data / "red" / "red_000.jpg", color_data / "blue",
               "--top-k", "2", "--out", out_csv)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 + len(list((color_data / "blue").glob("*.jpg")))
    assert lines[0].startswith(str(color_data / "red" / "red_000.jpg"))
    rows = list(csv.DictReader(out_csv.open()))
    assert set(rows[0]) == {"path", "predicted", "prob_blue", "prob_green", "prob_red"}


@pytest.mark.slow
def test_predict_glob(cli_run, color_data):
    run, _ = cli_run
    r = imgclf("predict", run, str(color_data / "green" / "*.jpg"))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == len(list((color_data / "green").glob("*.jpg")))


@pytest.mark.slow
def test_evaluate_on_validation_and_on_other_folder(cli_run, color_data, tmp_path):
    run, _ = cli_run
    r = imgclf("evaluate", run)
    assert r.returncode == 0, r.stderr
    assert "accuracy=" in r.stderr and (run / "confusion.csv").is_file()
    assert (run / "evaluation.json").is_file()
    r = imgclf("evaluate", run, color_data, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_samples"] == len(list(color_data.rglob("*.jpg")))
    assert (tmp_path / "ev" / "plots" / "confusion.png").is_file()


@pytest.mark.slow
def test_missing_data_is_one_clear_line(tmp_path):
    r = imgclf("train", tmp_path / "nope", *TINY_FLAGS, "--out", tmp_path)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2


@pytest.mark.slow
def test_predict_on_non_bundle_is_clear(tmp_path):
    r = imgclf("predict", tmp_path, tmp_path)
    assert r.returncode == 2 and "not a run directory or model bundle" in r.stderr
