"""Settings files: `imgclf train|cv --config FILE` and `imgclf.train(config="FILE")`.

The file gives the settings, flags typed on the command line override it (a flag left at its
default does not), unknown names get the closest valid one, and a run's own config.yaml
reproduces the run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf import api
from imgclf.cli.app import app
from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError

from conftest import TINY


def _captured(monkeypatch) -> dict:
    """Replace api.train / api.cross_validate by recorders of what the CLI passes them."""
    seen: dict = {}
    monkeypatch.setattr(api, "train", lambda config=None, resume=None, budget_start=None:
                        seen.update(cfg=config))
    monkeypatch.setattr(api, "cross_validate", lambda folds, config=None, resume=None:
                        seen.update(cfg=config, folds=folds))
    return seen


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_file_gives_the_settings_and_typed_flags_override_it(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    cfg_file = _write(tmp_path / "c.yaml", "data: photos\nmodel: resnet18\nepochs: 2\nlr: 1e-3\n"
                      "sizes: 128,160\nlogger: csv\nseed: 7\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg_file), "--epochs", "9",
                                 "--logger", "tensorboard,mlflow", "--logger", "csv"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.data, cfg.model, cfg.seed) == ("photos", "resnet18", 7)  # from the file
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML reads 1e-3 as text
    assert cfg.sizes == [128, 160]
    assert cfg.epochs == 9  # typed
    assert cfg.logger == ["tensorboard", "mlflow", "csv"]
    # A flag left at its default keeps the file's value, even one equal to the default.
    r = CliRunner().invoke(app, ["train", "--config", str(cfg_file), "other/"])
    assert r.exit_code == 0, r.output
    assert (seen["cfg"].data, seen["cfg"].epochs, seen["cfg"].seed) == ("other", 2, 7)
    r = CliRunner().invoke(app, ["train", "--config", str(cfg_file), "--seed", "42"])
    assert seen["cfg"].seed == 42


def test_unknown_setting_names_the_closest(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", "data: photos\nepoch: 3\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg_file)])
    assert isinstance(r.exception, ImgclfError)
    assert "unknown setting 'epoch'; did you mean 'epochs'?" in str(r.exception)
    with pytest.raises(ImgclfError, match="did you mean 'freeze_epochs'"):
        api.train(config=_write(tmp_path / "d.yaml", "data: photos\nfreeze_epoch: 1\n"))


def test_bad_values_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(ImgclfError, match="no such settings file"):
        api.train(config=tmp_path / "nope.yaml")
    r = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert isinstance(r.exception, ImgclfError) and "no such file" in str(r.exception)
    with pytest.raises(ImgclfError, match="--logger 'wandb' is not one of csv | tensorboard"):
        api.train(config=_write(tmp_path / "l.yaml", "data: photos\nlogger: [csv, wandb]\n"))
    with pytest.raises(ImgclfError, match="--lr takes a number or 'auto'"):
        api.train(config=_write(tmp_path / "r.yaml", "data: photos\nlr: fast\n"))
    assert not (tmp_path / "runs").exists()


def test_python_api_overrides_the_file(tmp_path, monkeypatch):
    from imgclf.commands import train as train_cmd

    seen = {}
    monkeypatch.setattr(train_cmd, "train", lambda data, config=None, resume=None, **o:
                        seen.update(cfg=config))
    cfg_file = _write(tmp_path / "c.yaml", "data: photos\nepochs: 2\nmodel: resnet18\n")
    api.train(config=str(cfg_file), epochs=4)
    assert (seen["cfg"].data, seen["cfg"].epochs, seen["cfg"].model) == ("photos", 4, "resnet18")
    api.train("elsewhere/", config=cfg_file)
    assert seen["cfg"].data == "elsewhere/"


def test_cv_takes_folds_from_the_file_unless_typed(tmp_path, monkeypatch):
    seen = _captured(monkeypatch)
    cfg_file = _write(tmp_path / "cv.yaml", "data: photos\nfolds: 3\nepochs: 1\n")
    r = CliRunner().invoke(app, ["cv", "--config", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert seen["folds"] == 3 and seen["cfg"].epochs == 1
    CliRunner().invoke(app, ["cv", "--config", str(cfg_file), "--folds", "4"])
    assert seen["folds"] == 4


def test_config_yaml_round_trips(tmp_path):
    cfg = TrainConfig(data="x", lr=1e-5, sizes=[64, 96], logger=["mlflow"], mixup=0.2)
    cfg.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == cfg


@pytest.mark.slow
def test_a_runs_config_yaml_reproduces_it(color_data, tmp_path):
    """`imgclf train --config runs/X/config.yaml` gives the same split and, with
    --deterministic, the same numbers."""
    out = tmp_path / "runs"
    first = api.train(color_data, out=str(out), name="x", seed=3, deterministic=True,
                      precision="32", **{**TINY, "epochs": 2})
    r = CliRunner().invoke(app, ["train", "--config", str(first.path / "config.yaml")])
    assert r.exit_code == 0, r.output
    second = out / "x-2"  # same name, taken: the next free one
    assert (second / "predictions.csv").is_file()

    def rows(run: Path) -> list[dict]:
        with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    assert rows(first.path) == rows(second)  # same images validated, same probabilities
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (first.path, second))
    timing = {"train_seconds", "images_per_second"}
    assert {k: v for k, v in m1.items() if k not in timing} == \
        {k: v for k, v in m2.items() if k not in timing}
    h1, h2 = ((p / "metrics.csv").read_text().splitlines() for p in (first.path, second))
    drop = lambda lines: [",".join(line.split(",")[:-1]) for line in lines]  # noqa: E731 seconds
    assert drop(h1) == drop(h2)
    c1 = TrainConfig.from_yaml(first.path / "config.yaml")
    c2 = TrainConfig.from_yaml(second / "config.yaml")
    assert c2.name == "x-2" and {**vars(c1), "name": None} == {**vars(c2), "name": None}


def test_mine_takes_a_settings_file(tmp_path, monkeypatch):
    from imgclf.commands.mine import command as mine_cmd
    from imgclf.commands.mine.state import options_from_file

    seen = {}
    monkeypatch.setattr(api, "mine", lambda run, pool, **kw: seen.update(pool=pool, **kw))
    cfg_file = _write(tmp_path / "m.yaml", "pool: clutter/\nrounds: 5\nper_round: 4\n")
    r = CliRunner().invoke(app, ["mine", "runs/x", "--config", str(cfg_file), "--rounds", "2"])
    assert r.exit_code == 0, r.output
    assert seen["config"] == cfg_file and seen["rounds"] == 2  # the command merges them
    assert options_from_file(cfg_file) == {"pool": "clutter/", "rounds": 5, "per_round": 4}
    with pytest.raises(ImgclfError, match="unknown setting 'per_rounds'; did you mean 'per_round'"):
        options_from_file(_write(tmp_path / "bad.yaml", "per_rounds: 3\n"))
    # The command: the file's settings, with the arguments that are given on top.
    got = {}

    def fake_resolve(manifest, given):
        got.update(given)
        raise ImgclfError("stop here")

    monkeypatch.setattr(mine_cmd, "_resolve_options", fake_resolve)
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data="d").to_yaml(run / "config.yaml")
    with pytest.raises(ImgclfError, match="stop here"):
        mine_cmd.mine(run, config=cfg_file, rounds=2, per_round=None)
    assert (got["pool"], got["rounds"], got["per_round"]) == ("clutter/", 2, 4)
