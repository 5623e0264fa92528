"""Corrections files (imgclf.data.corrections): parsing, applying, and refusing bad input whole."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imgclf.config import TrainConfig
from imgclf.data import corrections as corr
from imgclf.data.corrections import Correction, apply_corrections, read_corrections
from imgclf.data.samples import Sample, SampleTable
from imgclf.data.sources import from_folder, load_table
from imgclf.errors import DataError, ImgclfError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def table(class_folder) -> SampleTable:
    return from_folder(class_folder, valid_pct=0.3, seed=1)


def labels_of(table: SampleTable) -> dict[str, tuple[str, ...]]:
    return {Path(s.path).name: s.labels for s in table.samples}


def test_relabel_exclude_negative_keep(table, tmp_path):
    root = table.root
    f = write(tmp_path / "c.csv",
              "path,action,labels,time,source\n"
              f"{root / 'cat/cat_0.jpg'},relabel,dog,2026-01-01T00:00:00+00:00,data\n"
              "cat/cat_1.jpg,exclude,,,\n"                    # relative to the data folder
              f"{root / 'dog/dog_0.jpg'},negative,,,data\n"
              f"{root / 'bird/bird_0.jpg'},keep,,,data\n")
    before = labels_of(table)
    out, applied = corr.apply_file(table, f)
    after = labels_of(out)
    assert after["cat_0.jpg"] == ("dog",)
    assert "cat_1.jpg" not in after and len(out.samples) == len(table.samples) - 1
    assert after["dog_0.jpg"] == ("negative",)
    assert after["bird_0.jpg"] == before["bird_0.jpg"] == ("bird",)
    # Single-label data without a negative class gets one (sorted in with the others).
    assert out.classes == ["bird", "cat", "dog", "negative"] and applied.added_class == "negative"
    assert dict(applied.counts) == {"relabel": 1, "exclude": 1, "negative": 1, "keep": 1}
    note = next(n for n in out.notes if n.startswith("corrections applied"))
    assert "1 relabelled, 1 excluded, 1 marked negative, 1 kept as labelled" in note
    assert corr.file_digest(f)[:12] in note
    assert any("class 'negative' added" in n for n in out.notes)
    # Splits are kept: the validation set does not move under a relabel.
    split = {Path(s.path).name: s.split for s in table.samples}
    assert all(split[Path(s.path).name] == s.split for s in out.samples)
    # The input table is untouched.
    assert labels_of(table) == before


def test_negative_class_named_in_the_row_and_existing(tmp_path, make_dataset):
    root = make_dataset(tmp_path / "d", {"cat": 4, "dog": 4, "background": 3})
    t = from_folder(root, valid_pct=0.3, seed=0)
    out, applied = apply_corrections(
        t, [Correction(str(root / "cat/cat_0.jpg"), "negative", "background")])
    assert labels_of(out)["cat_0.jpg"] == ("background",) and applied.added_class is None
    assert out.classes == ["background", "cat", "dog"]


def test_multi_label_relabel_toggles_and_negative_is_empty(tmp_path):
    samples = [Sample(tmp_path / f"{i}.jpg", labs, "train") for i, labs in
               enumerate([("a",), ("a", "b"), ("b",), ("a", "c")])]
    t = SampleTable(samples, ["a", "b", "c"], True, tmp_path)
    out, applied = apply_corrections(t, [
        Correction(str(tmp_path / "0.jpg"), "relabel", "c b"),
        Correction(str(tmp_path / "1.jpg"), "relabel", ""),      # no label at all: allowed
        Correction(str(tmp_path / "2.jpg"), "negative", "")])
    got = labels_of(out)
    assert got["0.jpg"] == ("b", "c") and got["1.jpg"] == () and got["2.jpg"] == ()
    assert out.classes == ["a", "b", "c"] and applied.added_class is None
    assert applied.relabelled[0][1:] == (("a",), ("b", "c"))


def test_every_bad_line_is_listed_and_nothing_applied(table, tmp_path):
    root = table.root
    f = write(tmp_path / "bad.csv",
              "path,action,labels,time,source\n"
              f"{root / 'cat/cat_0.jpg'},relabel,dgo,,data\n"          # line 2: unknown label
              f"{root / 'nope.jpg'},exclude,,,data\n"                  # line 3: not in the data
              f"{root / 'cat/cat_2.jpg'},relabel,,,data\n"             # line 4: no label
              f"{root / 'cat/cat_3.jpg'},exclude,,,data\n")            # fine
    with pytest.raises(DataError) as e:
        corr.apply_file(table, f)
    msg = str(e.value)
    assert "3 bad lines" in msg and "nothing was applied" in msg
    assert "line 2: label 'dgo' is not a class of the data (did you mean 'dog'?)" in msg
    assert "line 3: " in msg and "nope.jpg' is not an image of the data" in msg
    assert "line 4: relabel without a label" in msg
    assert "line 5" not in msg


def test_damaged_rows_are_reported_by_line(tmp_path):
    f = write(tmp_path / "c.csv",
              "path,action,labels,time,source\n"
              "a.jpg,relabl,cat,,data\n"          # 2: typo'd action
              "b.jpg,exclude\n"                   # 3: too few cells
              ",keep,,,data\n"                    # 4: no path
              "c.jpg,keep,,,elsewhere\n"          # 5: bad source
              "\n"                                # blank lines are fine
              "d.jpg,keep,,,data\n"
              "d.jpg,exclude,,,data\n"            # 8: a second, different decision
              "e.jpg,keep,,,data\n"
              "e.jpg,keep,,,data\n")              # the same decision twice: fine
    with pytest.raises(DataError) as e:
        read_corrections(f)
    msg = str(e.value)
    assert "5 bad lines" in msg
    for expected in ("line 2: action 'relabl' is not one of keep, relabel, exclude, negative; "
                     "did you mean 'relabel'?", "line 3: 2 cells, the header has 5",
                     "line 4: no path", "line 5: source 'elsewhere'",
                     "line 8: 'd.jpg' is decided on line 7 too"):
        assert expected in msg


def test_not_a_csv_and_no_header(tmp_path):
    with pytest.raises(DataError, match="not a UTF-8 text CSV"):
        read_corrections(write_bytes(tmp_path / "x.csv", b"\xff\xd8\xff\xe0 jpeg"))
    with pytest.raises(DataError, match="line 1 must be the header"):
        read_corrections(write(tmp_path / "y.csv", "a.jpg,exclude\n"))
    with pytest.raises(DataError, match="cannot read the corrections file"):
        read_corrections(tmp_path / "missing.csv")
    assert read_corrections(write(tmp_path / "empty.csv", "")) == []


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_round_trip_and_optional_columns(tmp_path):
    rows = [Correction("/x/a b.jpg", "relabel", "milk bottle", corr.now(), "data"),
            Correction("/x/c,d.jpg", "exclude", "", "", "pool")]
    corr.write_corrections(tmp_path / "c.csv", rows)
    back = read_corrections(tmp_path / "c.csv")
    assert [dataclasses.replace(c, line=0) for c in back] == rows
    assert [c.line for c in back] == [2, 3]
    # A file written by hand with only path and action.
    f = write(tmp_path / "h.csv", "Path,Action\n/x/a.jpg,EXCLUDE\n")
    assert read_corrections(f) == [Correction("/x/a.jpg", "exclude", "", "", "data", 2)]


def test_pool_rows_are_left_to_mining(table, tmp_path):
    out, applied = apply_corrections(table, [Correction("/pool/x.jpg", "exclude", "", "", "pool")])
    assert applied.pool_rows == 1 and len(out.samples) == len(table.samples)
    assert any("mining-pool images apply to `imgclf mine` only" in n for n in out.notes)


def test_a_class_left_empty_leaves_the_class_list(table):
    birds = [s for s in table.samples if s.labels == ("bird",)]
    out, _ = apply_corrections(table, [Correction(str(s.path), "relabel", "cat") for s in birds])
    assert out.classes == ["cat", "dog"]
    assert any("bird left without images" in n for n in out.notes)


def test_load_table_applies_and_checks_the_digest(class_folder, tmp_path):
    f = write(tmp_path / "c.csv", f"path,action\n{class_folder / 'cat/cat_0.jpg'},exclude\n")
    cfg = TrainConfig(data=str(class_folder), corrections=str(f))
    corr.pin(cfg)
    assert cfg.corrections_sha256 == corr.file_digest(f)
    t = load_table(cfg)
    assert "cat_0.jpg" not in labels_of(t)
    # cross-validation folds are dealt on the corrected table
    folded = load_table(dataclasses.replace(cfg, folds=2, fold=0))
    assert len(folded.samples) == len(t.samples)
    write(f, f"path,action\n{class_folder / 'cat/cat_1.jpg'},exclude\n")
    with pytest.raises(DataError, match="changed since the run recorded it"):
        load_table(cfg)
    with pytest.raises(DataError, match="changed since the run recorded it"):
        corr.pin(cfg)
    with pytest.raises(ImgclfError, match="--corrections-sha256 pins"):
        TrainConfig(data="x", corrections_sha256="ab").check()


def test_pool_rows_checked_against_the_pool_when_given(table, tmp_path):
    pool = [str(tmp_path / "pool" / f"p{i}.jpg") for i in range(3)]
    rows = [Correction(pool[0], "exclude", "", "", "pool", 2),
            Correction(pool[1], "relabel", "cat", "", "pool", 3),
            Correction(pool[2], "keep", "", "", "pool", 4),
            Correction("/elsewhere/x.jpg", "exclude", "", "", "pool", 5)]
    with pytest.raises(DataError, match="line 5: '/elsewhere/x.jpg' is not an image of the mining pool"):
        apply_corrections(table, rows, pool=pool)
    out, applied = apply_corrections(table, rows[:3], pool=pool)
    assert applied.pool_removed == pool[:2] and len(out.samples) == len(table.samples)
    assert any("2 mining-pool images excluded or relabelled" in n for n in out.notes)
