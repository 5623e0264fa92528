"""Groups and cross-validation: group-aware splits, fold assignment, fold tables, `imgclf cv`."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf.commands import cv as crossval
from imgclf.commands import train as train_cmd
from imgclf.data.split import assign_folds, fold_table
from imgclf.config import TrainConfig
from imgclf.data import validate
from imgclf.data.samples import TEST, TRAIN, VALID, Sample, SampleTable
from imgclf.data.sources import load_source, load_table
from imgclf.errors import DataError, ImgclfError


def _samples(counts: dict[str, int], groups_per_class: int | None = None) -> list[Sample]:
    out = []
    for c, n in counts.items():
        for i in range(n):
            group = f"{c}-site{i % groups_per_class}" if groups_per_class else None
            out.append(Sample(Path(f"/d/{c}/{i}.jpg"), (c,), TRAIN, group))
    return out


def _shared_groups(samples: list[Sample], groups: int) -> list[Sample]:
    """Groups that hold several classes (a camera site sees every species)."""
    return [Sample(s.path, s.labels, s.split, f"site{int(s.path.stem) % groups}") for s in samples]


# ---------------------------------------------------------------------------------------------
# Group-aware train/valid split (sources) on generated images with known groups


def test_group_pattern_split_keeps_each_site_on_one_side(tmp_path, make_image):
    root = tmp_path / "traps"
    for site in range(6):
        for species in ("deer", "fox"):
            for i in range(4):
                make_image(root / species / f"site{site}_{i}.jpg")
    table = load_source(root, group_pattern=r"(site\d+)_", valid_pct=0.3, seed=3)
    sides = defaultdict(set)
    for s in table.samples:
        sides[s.group].add(s.split)
    assert len(sides) == 6
    assert all(len(v) == 1 for v in sides.values()), sides  # no group on both sides
    assert {s.split for s in table.samples} == {TRAIN, VALID}
    summary = validate.summarize(table)
    assert summary.groups[TRAIN] + summary.groups[VALID] == 6
    assert summary.groups[VALID] >= 1


# ---------------------------------------------------------------------------------------------
# Fold assignment


def test_every_sample_gets_one_fold_stratified_by_class():
    samples = _samples({"a": 50, "b": 25, "c": 10})
    folds = assign_folds(samples, 5, seed=0)
    assert len(folds) == len(samples) and set(folds) == set(range(5))
    per_fold = defaultdict(Counter)
    for s, k in zip(samples, folds):
        per_fold[k][s.label] += 1
    for c, n in {"a": 50, "b": 25, "c": 10}.items():
        shares = [per_fold[k][c] for k in range(5)]
        assert max(shares) - min(shares) <= 1, (c, shares)  # as even as possible
        assert sum(shares) == n


def test_folds_keep_groups_whole_and_still_stratify():
    samples = _shared_groups(_samples({"a": 60, "b": 30}), groups=12)
    folds = assign_folds(samples, 4, seed=1)
    fold_of_group = defaultdict(set)
    for s, k in zip(samples, folds):
        fold_of_group[s.group].add(k)
    assert all(len(v) == 1 for v in fold_of_group.values())  # no group in two folds
    assert set(folds) == set(range(4))
    for k in range(4):
        labels = Counter(s.label for s, f in zip(samples, folds) if f == k)
        assert labels["a"] > 0 and labels["b"] > 0


def test_folds_are_seeded_and_independent_of_order():
    samples = _samples({"a": 20, "b": 12, "c": 7}, groups_per_class=None)
    a = assign_folds(samples, 3, seed=7)
    reordered = list(reversed(samples))
    b = assign_folds(reordered, 3, seed=7)
    assert dict(zip(samples, a)) == dict(zip(reordered, b))
    assert assign_folds(samples, 3, seed=8) != a


def test_multilabel_folds_stratify_by_rarest_label():
    samples = [Sample(Path(f"/d/{i}.jpg"), ("common",) + (("rare",) if i % 10 == 0 else ()), TRAIN)
               for i in range(60)] + [Sample(Path("/d/none.jpg"), (), TRAIN)]
    folds = assign_folds(samples, 3, seed=0, multi_label=True)
    rare = Counter(k for s, k in zip(samples, folds) if "rare" in s.labels)
    assert sorted(rare.values()) == [2, 2, 2]


@pytest.mark.parametrize("samples, folds, message", [
    (_samples({"a": 5, "b": 5}), 1, "at least 2 folds"),
    (_samples({"a": 2, "b": 1}), 2, "class 'b' has a single image"),
    (_samples({"a": 6, "b": 6}, groups_per_class=1), 2, "class 'a' has a single group"),
    (_samples({"a": 2, "b": 2}), 5, "only 4 groups"),
])
def test_impossible_folds_are_clear_errors(samples, folds, message):
    with pytest.raises(DataError, match=message):
        assign_folds(samples, folds)


def test_fold_table_validates_on_one_fold_and_leaves_test_alone():
    samples = _samples({"a": 12, "b": 9})
    samples[0] = Sample(samples[0].path, samples[0].labels, VALID)
    samples.append(Sample(Path("/d/t.jpg"), ("a",), TEST))
    table = SampleTable(samples, ["a", "b"])
    pool = [s for s in samples if s.split != TEST]
    folds = assign_folds(pool, 3, seed=5)
    seen_valid = []
    for k in range(3):
        out = fold_table(table, 3, k, seed=5)
        valid = {s.path for s in out.split(VALID)}
        assert valid == {s.path for s, f in zip(pool, folds) if f == k}
        assert [s.path for s in out.split(TEST)] == [Path("/d/t.jpg")]
        assert "fold" in out.notes[-1]
        seen_valid += valid
    assert sorted(seen_valid) == sorted(s.path for s in pool)  # each image validated once
    with pytest.raises(ImgclfError, match="fold must be 0 .. 2"):
        fold_table(table, 3, 3)


# ---------------------------------------------------------------------------------------------
# imgclf cv end to end (tiny random-init model)


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory, color_data):
    """`imgclf cv` on the shared colour data set (3 classes x 12), 2 folds, one epoch each."""
    from imgclf.cli import app

    tmp = tmp_path_factory.mktemp("cv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))
        mp.setattr(train_cmd, "write_report", lambda *a, **k: None)  # not under test; slow on 2 cores
        result = CliRunner().invoke(app, [
            "cv", str(color_data), "--folds", "2", "--model", "test_efficientnet",
            "--no-pretrained", "--size", "32", "--epochs", "1", "--freeze-epochs", "0",
            "--lr", "0.01", "--batch-size", "8", "--workers", "0", "--out", str(tmp / "runs"),
            "--name", "cv"])
    assert result.exit_code == 0, result.output
    return color_data, tmp / "runs" / "cv"


def test_cv_writes_folds_summary_and_out_of_fold_predictions(tiny_cv):
    data, cv_dir = tiny_cv
    assert sorted(p.name for p in cv_dir.glob("fold-*")) == ["fold-0", "fold-1"]
    summary = json.loads((cv_dir / crossval.SUMMARY).read_text())
    assert summary["folds"] == 2 and summary["images"] == 36
    assert [r["fold"] for r in summary["per_fold"]] == [0, 1]
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "loss"):
        values = [r[name] for r in summary["per_fold"]]
        assert summary["mean"][name] == pytest.approx(sum(values) / 2)
        assert summary["std"][name] >= 0
    assert "balanced_accuracy" in summary["out_of_fold"]

    with open(cv_dir / crossval.OOF, newline="") as f:
        rows = list(csv.DictReader(f))
    files = sorted(str(p) for p in Path(data).rglob("*.jpg"))
    assert sorted(r["path"] for r in rows) == files  # every image exactly once
    assert {"prob_blue", "prob_green", "prob_red", "target", "predicted", "loss"} <= set(rows[0])
    for r in rows:
        assert sum(float(r[f"prob_{c}"]) for c in ("blue", "green", "red")) == pytest.approx(1, abs=1e-5)
    # The OOF fold of an image is the fold whose run validated it, and the fold's own
    # config.yaml reproduces that split.
    for k in range(2):
        run_valid = {s.path for s in load_table(
            TrainConfig.from_yaml(cv_dir / f"fold-{k}" / "config.yaml")).split(VALID)}
        assert run_valid == {Path(r["path"]) for r in rows if int(r["fold"]) == k}
    preds, folds = crossval.read_oof(cv_dir / crossval.OOF)
    assert len(preds.paths) == 36 and sorted(set(folds)) == [0, 1]


@pytest.mark.slow
def test_cv_resume_keeps_finished_folds_and_trains_missing_ones(tiny_cv, monkeypatch):
    import shutil

    _, cv_dir = tiny_cv
    monkeypatch.setattr(train_cmd, "write_report", lambda *a, **k: None)
    before = (cv_dir / "fold-0" / "metrics.json").read_text()
    preds, folds = crossval.read_oof(cv_dir / crossval.OOF)
    fold_before = dict(zip(preds.paths, folds))
    shutil.rmtree(cv_dir / "fold-1")
    (cv_dir / crossval.SUMMARY).unlink()
    result = crossval.cross_validate(resume=cv_dir)
    assert (cv_dir / "fold-0" / "metrics.json").read_text() == before  # not retrained
    assert (cv_dir / "fold-1" / "metrics.json").is_file()  # retrained, in its own folder
    assert result.summary["images"] == 36 and (cv_dir / crossval.SUMMARY).is_file()
    assert dict(zip(result.oof.paths, result.folds)) == fold_before  # the same folds again
    with pytest.raises(ImgclfError, match="not a cross-validation folder"):
        crossval.cross_validate(resume=cv_dir / "fold-0")
