"""The run directory: where each stage's output lands and how later commands read it back.

    runs/<name>/config.yaml, metrics.csv, metrics.json, predictions.csv, data_summary.json,
    model/ (the bundle), report.html, plots/*.png, checkpoints/

Only paths and plain readers/writers live here (bottom layer: nothing from evaluation or
deploy). `imgclf.commands.run.Run` adds the readers that need those (predictions, the bundle).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_text


def new_run_dir(out: str | Path, name: str | None, data: str | Path) -> Path:
    """A fresh run folder under `out`: `name`, or the data folder's name plus a timestamp."""
    out = Path(out)
    base = name or f"{_slug(Path(data).resolve().name) or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out / base
    n = 2
    while path.exists() and any(path.iterdir()):
        path = out / f"{base}-{n}"
        n += 1
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ImgclfError(f"cannot write the run folder {path} ({e.strerror}): pass a writable "
                          "folder with --out") from e
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40]


def read_json(path: Path, fix: str = "") -> dict | None:
    """A JSON file of the run directory, None when it is absent; damaged, an ImgclfError that
    names the file (and the `fix`, when given)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ImgclfError(f"{path} is damaged ({e})" + (f": {fix}" if fix else "")) from None


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV (columns: union of keys, in first-seen order), atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_rows_csv(path: Path) -> list[dict]:
    """metrics.csv back as dicts with numbers parsed."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


@dataclass
class RunDir:
    """A finished (or interrupted) run directory: its paths and plain files.

    `imgclf.commands.run.Run` extends it with the predictions and the bundle.
    """

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)
        if not (self.path / "config.yaml").is_file():
            raise ImgclfError(f"{self.path} is not an imgclf run directory (no config.yaml)")

    @property
    def bundle_path(self) -> Path:
        return self.path / "model"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def config(self):
        return TrainConfig.from_yaml(self.path / "config.yaml")

    def metrics(self) -> dict:
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def history(self) -> list[dict]:
        return read_rows_csv(self.path / "metrics.csv")

    def __repr__(self) -> str:
        m = self.metrics()
        keys = [k for k in ("valid_accuracy", "valid_zero_one_accuracy", "valid_loss") if k in m]
        shown = ", ".join(f"{k}={m[k]:.4f}" for k in keys)
        return f"{type(self).__name__}({str(self.path)!r}{', ' + shown if shown else ''})"
