"""Experiment tracking: a run's settings, every epoch of every stage and its outputs, sent to
CSV, TensorBoard and MLflow (`--logger csv,tensorboard,mlflow`).

The trackers are fed from what the run directory records anyway, so they hold the same numbers:
the settings (config.yaml), each metrics.csv row as it is written (the frozen head's epochs, the
unfrozen stages, the mining rounds: `imgclf mine` continues the same tracked run), then the
final validation numbers of metrics.json and, for MLflow, the bundle, report and run files as
artifacts.

    csv          <run>/logs/csv/params.yaml and metrics.csv (long format: step, stage, name,
                 value, time; appended to by --resume and mine)
    tensorboard  <run>/logs/tensorboard/ event files (`tensorboard --logdir runs/`): scalars
                 per epoch, the stage as text, the settings as hparams with the final numbers
    mlflow       a run named after the run directory in experiment --experiment, at
                 --mlflow-uri (else $MLFLOW_TRACKING_URI, else MLflow's default); its id is
                 kept in <run>/tracking.json so --resume and mine log to the same MLflow run

Metrics are the metrics.csv columns at step = epoch (numbered across stages), and the final
ones as `final/<name>`. TensorBoard and MLflow are imported only when asked for (the `track`
extra). A tracker that fails during training is dropped with a warning: the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import yaml

from imgclf.config import TrainConfig, parse_words
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_json, atomic_write_text
from imgclf.rundir import read_rows_csv

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
LOG_DIR = "logs"
_EXTRA = "pip install 'imgclf[track]'"
# Run files logged as MLflow artifacts at the end, next to the model/ folder.
_ARTIFACTS = ("report.html", "config.yaml", "metrics.json", "metrics.csv", "predictions.csv",
              "data_summary.json")


def _numbers(values: dict) -> dict[str, float]:
    """The finite numeric values of a row (text columns such as `stage` and NaNs left out)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[str(k)] = float(v)
    return out


def _flat_params(cfg: TrainConfig) -> dict[str, str]:
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}


class _Csv:
    name = "csv"

    def __init__(self, cfg: TrainConfig):
        self.folder: Path | None = None

    def start(self, run_dir: Path, run_name: str, state: dict) -> None:
        self.folder = run_dir / LOG_DIR / "csv"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics = self.folder / "metrics.csv"
        if not self.metrics.is_file():
            atomic_write_text(self.metrics, "step,stage,name,value,time\n")

    def params(self, params: dict[str, str]) -> None:
        p = self.folder / "params.yaml"
        old = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
        atomic_write_text(p, yaml.safe_dump({**(old or {}), **params}, sort_keys=False))

    def row(self, step: int, stage: str, values: dict[str, float]) -> None:
        now = f"{time.time():.3f}"
        stage_cell = '"' + stage.replace('"', '""') + '"' if "," in stage or '"' in stage \
            else stage
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.writelines(f"{step},{stage_cell},{k},{v:.8g},{now}\n" for k, v in values.items())

    def final(self, step: int, values: dict[str, float], run_dir: Path) -> None:
        self.row(step, "final", {f"final/{k}": v for k, v in values.items()})

    def close(self, status: str) -> None:
        pass


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: TrainConfig):
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: the `track` extra
        except ImportError:
            raise ImgclfError(f"--logger tensorboard needs TensorBoard: {_EXTRA} (or pip "
                              "install tensorboard)") from None
        self._writer_class = SummaryWriter
        self.writer = None
        self.stage: str | None = None
        self.hparams: dict[str, str] = {}

    def start(self, run_dir: Path, run_name: str, state: dict) -> None:
        self.writer = self._writer_class(log_dir=str(run_dir / LOG_DIR / "tensorboard"))

    def params(self, params: dict[str, str]) -> None:
        self.hparams.update(params)
        table = "\n".join(["| setting | value |", "|---|---|"]
                          + [f"| {k} | {v} |" for k, v in params.items()])
        self.writer.add_text("settings", table)

    def row(self, step: int, stage: str, values: dict[str, float]) -> None:
        if stage != self.stage:
            self.writer.add_text("stage", f"{stage} (from epoch {step})", step)
            self.stage = stage
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def final(self, step: int, values: dict[str, float], run_dir: Path) -> None:
        from torch.utils.tensorboard.summary import hparams  # lazy: the `track` extra

        metrics = {f"final/{k}": v for k, v in values.items()}
        for part in hparams(self.hparams, metrics):  # the HParams tab: settings -> numbers
            self.writer.file_writer.add_summary(part)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: TrainConfig):
        try:
            from mlflow.tracking import MlflowClient  # lazy: the `track` extra
        except ImportError:
            raise ImgclfError(f"--logger mlflow needs MLflow: {_EXTRA} (or pip install "
                              "mlflow)") from None
        self.uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.uri = self.client.tracking_uri
            exp = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = (exp.experiment_id if exp is not None
                                  else self.client.create_experiment(cfg.experiment))
        except Exception as e:  # noqa: BLE001 - any store or connection problem, one line
            raise ImgclfError(self._explain(e)) from None
        self.run_id: str | None = None

    def _explain(self, e: Exception) -> str:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "MLFLOW_ALLOW_FILE_STORE" in str(e):
            hint = (": this MLflow refuses local file: stores unless MLFLOW_ALLOW_FILE_STORE=true "
                    "is set; or pass --mlflow-uri http://HOST:5000 (a tracking server)")
        elif "unsupported URI" in str(e) or "sqlalchemy" in str(e).lower():
            hint = (": MLflow's database stores need the full package (pip install mlflow); or "
                    "pass --mlflow-uri with a server or a file: folder")
        return f"MLflow tracking at {self.uri or 'the default URI'} failed ({text}){hint}"

    def start(self, run_dir: Path, run_name: str, state: dict) -> None:
        old = state.get("mlflow") or {}
        if old.get("run_id") and old.get("tracking_uri") == self.uri:
            try:  # --resume or mine: the same MLflow run goes on
                self.client.update_run(old["run_id"], status="RUNNING")
                self.run_id = old["run_id"]
            except Exception:  # noqa: BLE001 - deleted in the meantime: a new run
                self.run_id = None
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
                "imgclf.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
        state["mlflow"] = {"tracking_uri": self.uri, "experiment_id": self.experiment_id,
                           "run_id": self.run_id}

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # lazy: the `track` extra

        have = self.client.get_run(self.run_id).data.params
        # A param once logged cannot change: a resumed or mined run adds only new ones.
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric  # lazy: the `track` extra

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def row(self, step: int, stage: str, values: dict[str, float]) -> None:
        self._metrics(step, values)
        self.client.set_tag(self.run_id, "stage", stage)  # the stage being trained

    def final(self, step: int, values: dict[str, float], run_dir: Path) -> None:
        self._metrics(step, {f"final/{k}": v for k, v in values.items()})
        if (run_dir / "model").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "model"), "model")
        for name in _ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


_TRACKERS = {"csv": _Csv, "tensorboard": _TensorBoard, "mlflow": _MLflow}


class Tracking:
    """The trackers of one run (none when `--logger` is not given); a context manager that
    closes them, marking the tracked run failed (or killed, on Ctrl-C) when the block raises.

    Use: `connect` before anything is written (a missing extra or an unreachable MLflow store
    stops the run there), `start` once the run directory exists, then `params`, `row` for
    each metrics.csv row and `finish` with the run's outputs.
    """

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.run_dir: Path | None = None
        self.last_step = -1  # the last epoch logged (tracking.json keeps it)
        self.state: dict = {}

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, method: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - tracking never stops training
                log.warning("Warning: %s tracking failed (%s: %s); the run goes on without it",
                            t.name, type(e).__name__, e)
                self.trackers.remove(t)

    def start(self, run_dir: Path, run_name: str | None = None) -> None:
        """Open the trackers' runs for `run_dir` (continuing those of tracking.json)."""
        if not self.trackers:
            return
        self.run_dir = Path(run_dir)
        path = self.run_dir / TRACKING_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            state = {}
        self.state = state
        self.last_step = int(state.get("last_step", -1))
        name = run_name or _run_name(self.run_dir)
        self._each("start", self.run_dir, name, state)
        atomic_write_json(path, state)
        log.info("Tracking with %s", ", ".join(t.name for t in self.trackers))

    def params(self, params: dict) -> None:
        self._each("params", {str(k): str(v) for k, v in params.items()})

    def row(self, row: dict) -> None:
        """One metrics.csv row: its numbers at step = its epoch."""
        if not self.trackers:
            return
        step = int(row.get("epoch", max(self.last_step, 0)))
        self.last_step = max(self.last_step, step)
        values = _numbers({k: v for k, v in row.items() if k not in ("epoch", "round")})
        self._each("row", step, str(row.get("stage", "")), values)
        self.state["last_step"] = self.last_step
        atomic_write_json(self.run_dir / TRACKING_FILE, self.state)

    def finish(self, summary: dict, params: dict | None = None) -> None:
        """The final numbers (metrics.json's scalars) and the outputs; trackers closed."""
        if params:
            self.params(params)
        self._each("final", max(self.last_step, 0), _numbers(summary), self.run_dir)
        self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        """Close the trackers; MLflow records `status` (FINISHED, FAILED or KILLED)."""
        self._each("close", status)
        self.trackers = []

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.trackers:
            self.close("KILLED" if kind is KeyboardInterrupt else "FAILED" if kind is not None
                       else "FINISHED")


def connect(cfg: TrainConfig, *, enabled: bool = True) -> Tracking:
    """The trackers `cfg.logger` names, imported and reachable, or an ImgclfError naming what
    to install or fix; `enabled=False` (the other processes of a DDP run) tracks nothing."""
    names = parse_words(cfg.logger) or []
    if not enabled:
        return Tracking([])
    return Tracking([_TRACKERS[n](cfg) for n in dict.fromkeys(names)])


def log_new_rows(tracker: Tracking, run_dir: Path, *, stage_prefix: str) -> None:
    """Send the metrics.csv rows of stages named `stage_prefix...` that the tracked run does
    not have yet (past its last step), then the final numbers and outputs. `imgclf mine` calls
    it once its rounds are written: a rerun that trains nothing new logs nothing."""
    if not tracker:
        return
    fresh = [r for r in read_rows_csv(Path(run_dir) / "metrics.csv")
             if str(r.get("stage", "")).startswith(stage_prefix)
             and int(r.get("epoch", -1)) > tracker.last_step]
    for r in fresh:
        tracker.row(r)
    if fresh:
        metrics_p = Path(run_dir) / "metrics.json"
        tracker.finish(json.loads(metrics_p.read_text()) if metrics_p.is_file() else {})


def run_params(cfg: TrainConfig) -> dict[str, str]:
    """A run's settings as tracker parameters (lists comma-joined)."""
    return _flat_params(cfg)


def _run_name(run_dir: Path) -> str:
    """The run directory's name; a cross-validation fold's with its folder's (cv/fold-0)."""
    if (run_dir.parent / "cv_config.yaml").is_file():
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name
