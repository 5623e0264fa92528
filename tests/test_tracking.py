"""Experiment tracking (`--logger csv,tensorboard,mlflow`) against the real libraries with
local stores: an MLflow `file:` folder read back with the MLflow client, TensorBoard event files
read back with TensorBoard's event reader, and the CSV log."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from imgclf.commands import tracking
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError

mlflow = pytest.importorskip("mlflow", reason="the `track` extra (make test installs it)")
pytest.importorskip("tensorboard", reason="the `track` extra (make test installs it)")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A local file: store (MLflow 3 refuses those unless told they are wanted)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return (tmp_path / "mlruns").as_uri()


def _mlflow_run(run_dir: Path):
    state = json.loads((run_dir / tracking.TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _tensorboard(run_dir: Path):
    acc = event_accumulator.EventAccumulator(
        str(run_dir / "logs" / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0,
                                                              event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def _rows(run_dir: Path) -> list[dict]:
    from imgclf.rundir import read_rows_csv

    return read_rows_csv(run_dir / "metrics.csv")


def test_rows_reach_every_tracker(tmp_path, mlflow_store):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.json").write_text("{}")
    (run_dir / "report.html").write_text("<html></html>")
    cfg = TrainConfig(data="d", logger=["csv", "tensorboard", "mlflow"], mlflow_uri=mlflow_store,
                      experiment="tests")
    rows = [{"epoch": 0, "stage": "frozen", "lr": 1e-3, "train_loss": 1.5, "valid_loss": 1.2,
             "valid_accuracy": 0.5, "seconds": 1.0},
            {"epoch": 1, "stage": "unfrozen", "lr": 5e-4, "train_loss": 0.9, "valid_loss": 0.8,
             "valid_accuracy": 0.75, "seconds": 2.0}]
    with tracking.connect(cfg) as t:
        t.start(run_dir)
        t.params(tracking.run_params(cfg))
        for r in rows:
            t.row(r)
        t.finish({"valid_accuracy": 0.75, "model": "x", "interrupted": False})

    client, run = _mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["logger"] == "csv,tensorboard,mlflow" and run.data.params["data"] == "d"
    assert _history(client, run, "valid_accuracy") == [(0, 0.5), (1, 0.75)]
    assert run.data.metrics["final/valid_accuracy"] == 0.75
    assert "final/interrupted" not in run.data.metrics  # booleans and text are not metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "report.html"}

    acc = _tensorboard(run_dir)
    assert [(e.step, e.value) for e in acc.Scalars("valid_loss")] == [(0, pytest.approx(1.2)),
                                                                     (1, pytest.approx(0.8))]
    assert acc.Scalars("final/valid_accuracy")[0].value == pytest.approx(0.75)
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("stage/text_summary")]
    assert texts == ["frozen (from epoch 0)", "unfrozen (from epoch 1)"]

    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        long = list(csv.DictReader(f))
    assert {(r["step"], r["stage"], r["name"]) for r in long} >= {
        ("0", "frozen", "valid_accuracy"), ("1", "unfrozen", "train_loss"),
        ("1", "final", "final/valid_accuracy")}


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImgclfError, match=r"--logger mlflow needs MLflow: pip install 'imgclf\[track\]'"):
        tracking.connect(TrainConfig(data="d", logger=["mlflow"]))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImgclfError, match="--logger tensorboard needs TensorBoard"):
        tracking.connect(TrainConfig(data="d", logger=["tensorboard"]))


def test_an_unknown_logger_is_refused_before_anything(tmp_path):
    from imgclf import api

    with pytest.raises(ImgclfError, match="--logger 'wandb' is not one of csv | tensorboard"):
        api.train(tmp_path, logger=["csv", "wandb"], out=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_refused_file_store_says_what_to_do(tmp_path, monkeypatch):
    if tuple(int(x) for x in mlflow.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("this MLflow still accepts file: stores")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ImgclfError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        tracking.connect(TrainConfig(data="d", logger=["mlflow"],
                                     mlflow_uri=(tmp_path / "m").as_uri()))


@pytest.fixture
def tiny_weights(tmp_path):
    """A local 'pretrained' file, so that the run has a frozen stage (trained outside Lightning)."""
    from safetensors.torch import save_file

    from imgclf.training import models

    torch.manual_seed(0)
    model = models.create_model("test_efficientnet", 1000, pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_train_and_mine_are_tracked_epoch_by_epoch(color_data, tmp_path, tiny_weights,
                                                   mlflow_store):
    from imgclf import api
    from test_mining import make_pool

    run = api.train(color_data, model="test_efficientnet", weights=str(tiny_weights), size=32,
                    epochs=2, freeze_epochs=1, batch_size=8, out=str(tmp_path / "runs"),
                    name="tracked", logger="csv,tensorboard,mlflow", mlflow_uri=mlflow_store)
    rows = _rows(run.path)
    assert [r["stage"] for r in rows] == ["frozen", "unfrozen", "unfrozen"]
    metrics = run.metrics()

    client, mrun = _mlflow_run(run.path)
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "tracked"
    assert mrun.data.params["model"] == "test_efficientnet" and mrun.data.params["epochs"] == "2"
    assert mrun.data.params["task"] == "single_label"
    for key in ("valid_loss", "valid_accuracy", "train_loss"):
        assert _history(client, mrun, key) == [(r["epoch"], pytest.approx(r[key], rel=1e-5))
                                               for r in rows]
    assert mrun.data.metrics["final/valid_accuracy"] == pytest.approx(metrics["valid_accuracy"])
    top = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"model", "report.html", "config.yaml", "metrics.json", "metrics.csv"} <= top
    inside = {a.path for a in client.list_artifacts(mrun.info.run_id, "model")}
    assert inside == {"model/model.json", "model/weights.safetensors"}

    acc = _tensorboard(run.path)
    assert [e.step for e in acc.Scalars("valid_accuracy")] == [r["epoch"] for r in rows]
    assert [e.value for e in acc.Scalars("train_loss")] == \
        [pytest.approx(r["train_loss"], rel=1e-5) for r in rows]
    # The HParams tab: the settings against the final numbers.
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")

    # Mining continues the same tracked run, its epochs numbered after the training's.
    result = api.mine(run.path, make_pool(tmp_path / "pool"), rounds=1, per_round=2, epochs=1,
                      freeze_epochs=0, patience=1)
    mined = [r for r in _rows(run.path) if str(r["stage"]).startswith("mining")]
    assert mined and result.best_round is not None
    client, again = _mlflow_run(run.path)
    assert again.info.run_id == mrun.info.run_id and again.info.status == "FINISHED"
    assert _history(client, again, "valid_loss")[-len(mined):] == [
        (r["epoch"], pytest.approx(r["valid_loss"], rel=1e-5)) for r in mined]
    assert _history(client, again, "fp_rate_V")  # the rounds' own numbers
    assert again.data.params["mine.per_round"] == "2"
    acc = _tensorboard(run.path)
    assert [e.step for e in acc.Scalars("valid_loss")] == [r["epoch"] for r in _rows(run.path)]
    # Rerunning a finished mining trains nothing and logs nothing twice.
    api.mine(run.path)
    client, third = _mlflow_run(run.path)
    assert len(_history(client, third, "valid_loss")) == len(_rows(run.path))
