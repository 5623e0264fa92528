"""`imgclf runs` (the runs under a folder as a table) and `imgclf compare` (one HTML page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf.cli.app import app
from imgclf.commands import runs as runs_cmd
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_json
from imgclf.rundir import write_rows_csv


def fake_run(path: Path, *, metrics: dict | None = None, rows: list[dict] | None = None,
             **settings) -> Path:
    """A run directory as train writes it: config.yaml, metrics.csv, metrics.json."""
    path.mkdir(parents=True)
    TrainConfig(**{"data": "/data/photos", "name": path.name, **settings}).to_yaml(
        path / "config.yaml")
    if rows is not None:
        write_rows_csv(path / "metrics.csv", rows)
    if metrics is not None:
        atomic_write_json(path / "metrics.json", metrics)
    return path


def _rows(acc: list[float], stage: str = "unfrozen") -> list[dict]:
    return [{"epoch": i, "stage": "frozen" if i == 0 else stage, "lr": 1e-3,
             "train_loss": 1.0 - a / 2, "valid_loss": 1.1 - a / 2, "valid_accuracy": a,
             "seconds": 1.5} for i, a in enumerate(acc)]


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "runs"
    fake_run(root / "base", rows=_rows([0.5, 0.7, 0.8]),
             metrics={"valid_accuracy": 0.8, "model": "tf_efficientnet_lite0", "lr": 2.1e-3,
                      "train_seconds": 35.6, "epochs": 3, "best_epoch": 2})
    fake_run(root / "mixup", mixup=0.2, epochs=8, lr=1e-3, rows=_rows([0.5, 0.75, 0.9]),
             metrics={"valid_accuracy": 0.9, "model": "tf_efficientnet_lite0", "lr": 1e-3,
                      "train_seconds": 61.0, "epochs": 3, "best_epoch": 2})
    fake_run(root / "cv" / "fold-0", model="resnet18", folds=2, fold=0,
             rows=_rows([0.4, 0.6]), metrics={"valid_zero_one_accuracy": 0.6,
                                               "model": "resnet18", "train_seconds": 20.0})
    fake_run(root / "broken")  # started, never finished
    return root


def test_rows_are_data(folder):
    rows = {r["run"]: r for r in runs_cmd.list_runs(folder)}
    assert set(rows) == {"base", "mixup", "cv/fold-0", "broken"}
    base, mix = rows["base"], rows["mixup"]
    assert (base["data"], base["model"], base["score"], base["seconds"]) == \
        ("data/photos", "tf_efficientnet_lite0", 0.8, 35.6)
    assert base["recipe"] == "1+3 ep, lr 2.1e-03 (auto), bs 32"  # the epochs that ran
    assert mix["recipe"] == "1+8 ep, lr 1.0e-03, bs 32, mixup 0.2"
    assert rows["cv/fold-0"]["metric"] == "exact match"
    assert rows["broken"]["status"] == "unfinished" and rows["broken"]["finished"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", base["finished"])
    ranked = [r["run"] for r in runs_cmd.list_runs(folder, sort="score")]
    assert ranked == ["mixup", "base", "cv/fold-0", "broken"]
    assert [r["run"] for r in runs_cmd.list_runs(folder)][-1] == "broken"  # unfinished last


def test_runs_prints_a_table(folder):
    r = CliRunner().invoke(app, ["runs", str(folder), "--sort", "score"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.index("mixup") < out.index("base") and "0.9000" in out and "61 s" in out
    assert "unfinished" in out
    r = CliRunner().invoke(app, ["runs", str(folder / "nope")])
    assert isinstance(r.exception, ImgclfError) and "is not a folder" in str(r.exception)


def test_compare_writes_one_self_contained_page(folder, tmp_path):
    out = tmp_path / "cmp.html"
    r = CliRunner().invoke(app, ["compare", str(folder / "base"), str(folder / "mixup"),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 1  # the curves, embedded
    assert not re.search(r"""(src|href)=["'](https?:|//|[^d"'#])""", html)  # nothing external
    differ = html[html.index("Settings that differ"):html.index("settings the same")]
    for name in ("mixup", "epochs", "lr"):
        assert f"<code>{name}</code>" in differ
    assert "<code>name</code>" not in html  # the run's name is not a setting
    assert "<code>model</code>" not in differ and "<code>model</code>" in html


def test_compare_needs_two_runs(folder):
    with pytest.raises(ImgclfError, match="at least two"):
        runs_cmd.compare([folder / "base"])
    with pytest.raises(ImgclfError, match="not an imgclf run directory"):
        runs_cmd.compare([folder / "base", folder])


def test_curves_overlay_one_line_per_run():
    from imgclf.report.compare import curves_figure

    fig = curves_figure([_rows([0.5, 0.7]), _rows([0.4, 0.6, 0.9])], ["a", "b"], ["C0", "C1"])
    score, loss, train = fig.axes
    assert score.get_title() == "Validation accuracy"
    runs = [line for line in score.get_lines() if not line.get_label().startswith("_")]
    assert [len(line.get_xdata()) for line in runs] == [2, 3]
    assert [t.get_text() for t in score.get_legend().get_texts()] == ["a", "b"]
