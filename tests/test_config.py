"""TrainConfig: each option declared once, checked in one place, the CLI generated from it."""

from __future__ import annotations

import dataclasses
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import imgclf
from imgclf.config import TrainConfig, option_names, with_options
from imgclf.errors import ImgclfError


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # help lines unwrapped, whatever the terminal
    return subprocess.run([sys.executable, "-m", "imgclf.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


def test_every_field_declares_its_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"
    assert "extra" not in option_names()


def test_unknown_keyword_names_the_closest_option(tmp_path):
    with pytest.raises(ImgclfError, match=r"^unknown option 'epoch'; did you mean 'epochs'\?$"):
        imgclf.train(tmp_path, epoch=3)
    with pytest.raises(ImgclfError, match="did you mean 'batch_size'"):
        imgclf.cross_validate(tmp_path, batchsize=8)
    with pytest.raises(ImgclfError, match="unknown option 'zzzz' .*imgclf train --help"):
        with_options(None, zzzz=1)
    assert not any(tmp_path.iterdir())


def test_from_yaml_refuses_unknown_keys_with_a_suggestion(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"data": "x", "lr_mul": 5}))
    with pytest.raises(ImgclfError, match=r"config.yaml: unknown setting 'lr_mul'; did you mean 'lr_mult'\?"):
        TrainConfig.from_yaml(p)


@pytest.mark.parametrize("text, says", [
    ("data: x\nepochs: !!python/object/apply:os.system ['echo pwned']\n",
     "not a readable settings file at line 2"),
    ("data: x\nepochs: [1\n", "not a readable settings file"),
    ("data: x\nepochs: five\n", "--epochs takes a number, not 'five'"),
])
def test_damaged_config_yaml_is_one_clear_error(tmp_path, text, says):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ImgclfError, match=re.escape(says)):
        TrainConfig.from_yaml(p).check()


def test_yaml_round_trip_and_old_runs_with_empty_extra(tmp_path):
    cfg = TrainConfig(data="photos", sizes=[128, 224], lr=0.01)
    cfg.to_yaml(tmp_path / "a.yaml")
    assert TrainConfig.from_yaml(tmp_path / "a.yaml") == cfg
    raw = {**dataclasses.asdict(cfg), "extra": {}}  # config.yaml written before `extra` went
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    assert TrainConfig.from_yaml(tmp_path / "b.yaml") == cfg


@pytest.mark.parametrize("change, message", [
    # bounds
    (dict(batch_size=0), "--batch-size 0 must be >= 1"),
    (dict(lr=0.0), "--lr 0 must be > 0"),
    (dict(lr="fast"), "--lr takes a number or 'auto', not 'fast'"),
    (dict(workers=-1), "--workers -1 must be >= 0"),
    (dict(epochs=-1), "--epochs -1 must be >= 0"),
    (dict(freeze_epochs=-1), "--freeze-epochs -1 must be >= 0"),
    (dict(size=8), "--size 8 must be >= 16"),
    (dict(sizes=[8, 224]), "--sizes 8,224 must be >= 16"),
    (dict(seed=-1), "--seed -1 must be >= 0"),
    (dict(valid_pct=1.0), "--valid-pct 1 must be > 0 and < 1"),
    (dict(valid_pct=0.0), "--valid-pct 0 must be > 0 and < 1"),
    (dict(lr_mult=0.5), "--lr-mult 0.5 must be >= 1"),
    (dict(tta=-1), "--tta -1 must be >= 0"),
    (dict(mixup=-0.1), "--mixup -0.1 must be >= 0"),
    (dict(label_smoothing=1.0), "--label-smoothing 1 must be >= 0 and < 1"),
    (dict(num_nodes=0), "--num-nodes 0 must be >= 1"),
    (dict(epochs="3"), "--epochs takes a number, not '3'"),
    # choices
    (dict(precision="64-true"), "--precision '64-true' is not one of auto | 32 | bf16-mixed | 16-mixed"),
    (dict(threshold_metric="accuracy"), "--threshold-metric 'accuracy' is not one of zero_one | hamming | f1_macro"),
    (dict(balance="oversample"), "--balance 'oversample' is not one of auto | none | weights | sampler"),
    (dict(batchnorm="eval"), "--batchnorm 'eval' is not one of adapt | frozen | train"),
    (dict(resize="pad"), "--resize 'pad' is not one of auto | crop | squish"),
    (dict(tta_reduce="median"), "--tta-reduce 'median' is not one of mean | max"),
    (dict(stage_schedule="cosine"), "--stage-schedule 'cosine' is not one of continue | restart"),
    (dict(augment_on="gpu"), "--augment-on 'gpu' is not one of auto | loader | device"),
    # formats and combinations
    (dict(norm_stats="0.5"), "--norm-stats '0.5'"),
    (dict(sizes=[128, 224], size=192), "--size 192 and --sizes 128,224 disagree"),
    (dict(folds=5, fold=5), "--fold 5 must be < --folds (5)"),
    (dict(folds=1), "--folds 1"),
    (dict(label_smoothing=0.1, multi_label=True), "--label-smoothing applies to single-label"),
    (dict(data=""), "no data given"),
])
def test_bad_values_are_one_line_naming_the_flag(change, message):
    cfg = dataclasses.replace(TrainConfig(data="photos"), **change)
    with pytest.raises(ImgclfError) as e:
        cfg.check()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_and_edge_values_pass():
    TrainConfig(data="photos").check()
    TrainConfig(data="photos", lr=0.01, workers=0, epochs=0, freeze_epochs=0, size=224,
                lr_mult=1.0, tta=2, tta_reduce="max", sizes=[128, 224], folds=5, fold=4,
                precision="32", multi_label=True, threshold_metric="f1_macro").check()


def _flags(help_text: str) -> set[str]:
    return {word.strip("│,") for word in help_text.split() if word.startswith("--")}


@pytest.mark.slow
@pytest.mark.parametrize("command, missing", [("train", set()), ("cv", {"fold"})])
def test_help_lists_every_option_as_a_flag(command, missing):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    flags = _flags(r.stdout)
    expected = {"--" + n.replace("_", "-") for n in option_names() if n not in {"data", *missing}}
    assert expected - flags == set(), f"missing in `imgclf {command} --help`"
    assert {"--resume", "--single-label", "--no-pretrained", "--out"} <= flags
    assert "[default: frozen]" in r.stdout and "[default: squish]" in r.stdout


@pytest.mark.slow
def test_cv_folds_default_is_five():
    r = cli("cv", "--help")
    line = next(ln for ln in r.stdout.splitlines() if "--folds" in ln)
    assert "[default: 5]" in line


@pytest.mark.slow
def test_cli_bad_value_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    r = cli("train", tmp_path, "--batch-size", "0", "--out", out)
    assert r.returncode == 2, r.stderr
    assert "--batch-size 0 must be >= 1" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = cli("cv", tmp_path, "--balance", "x", "--out", out)
    assert r.returncode == 2 and "--balance 'x' is not one of" in r.stderr
    assert not out.exists()


def test_cli_text_options_parse_as_before(tmp_path):
    from imgclf.cli.options import config_from_flags

    cfg = config_from_flags({"data": tmp_path, "lr": "0.01", "devices": "2", "sizes": "128,224",
                             "stage_epochs": None, "out": Path("runs"), "multi_label": None})
    assert (cfg.data, cfg.lr, cfg.devices, cfg.sizes, cfg.out) == (str(tmp_path), 0.01, 2,
                                                                   [128, 224], "runs")
    assert cfg.stage_epochs is None and cfg.multi_label is None
    assert config_from_flags({"lr": "auto", "devices": "0,1"}).devices == "0,1"
    with pytest.raises(ImgclfError, match="--lr takes a number or 'auto', not 'fast'"):
        config_from_flags({"lr": "fast"})
    with pytest.raises(ImgclfError, match="--sizes"):
        config_from_flags({"sizes": "128,big"})


@pytest.mark.slow
def test_cli_suggests_close_flag_names(tmp_path):
    r = cli("train", tmp_path, "--epoch", "3")
    assert r.returncode == 2 and "--epochs" in r.stderr


def test_choices_match_the_modules_that_act_on_them():
    # Until those modules import the constants from imgclf.config, they must not drift apart.
    from imgclf import config, evaluation
    from imgclf.data import presize
    from imgclf.training import balance

    assert set(config.THRESHOLD_METRICS) == set(evaluation.THRESHOLD_METRICS)
    assert set(config.RESIZE_METHODS) == set(presize.RESIZE_METHODS)  # one declaration
    assert set(config.BALANCE_MODES) == set(balance.MODES)


def test_a_run_from_before_an_option_resumes_as_it_trained(tmp_path):
    from imgclf.config import BEFORE_OPTION, TrainConfig

    saved = tmp_path / "config.yaml"
    TrainConfig(data="photos").to_yaml(saved)
    assert TrainConfig.from_yaml(saved, run=True).freeze_early is True  # recorded, kept
    old = tmp_path / "old.yaml"
    old.write_text("\n".join(line for line in saved.read_text().splitlines()
                             if not line.startswith("freeze_early")) + "\n")
    assert TrainConfig.from_yaml(old, run=True).freeze_early is BEFORE_OPTION["freeze_early"]
    assert TrainConfig.from_yaml(old).freeze_early is True  # a settings file: today's default
