"""Checks before training (bad files, duplicates, leakage, classes left empty) and the data summary."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from imgclf.cli.render import data_summary
from imgclf.data.images import ImageInfo
from imgclf.data.samples import TRAIN, VALID, Sample, SampleTable
from imgclf.data.sources import from_folder
from imgclf.data.summary import summarize
from imgclf.data.validate import check_table, scan_images
from imgclf.errors import DataError, ImageError


@pytest.fixture
def split_folder(tmp_path, make_dataset) -> Path:
    return make_dataset(tmp_path / "data", {"train/cat": 4, "train/dog": 4, "valid/cat": 2, "valid/dog": 2})


def test_scan_images_collects_results_and_reasons(tmp_path, make_image):
    good = make_image(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    results, errors = scan_images([good, str(bad), good], workers=2)
    assert list(results) == [good] and isinstance(results[good], ImageInfo)
    assert "empty" in errors[bad]


def test_scan_images_custom_fn_and_progress(tmp_path, make_image):
    paths = [make_image(tmp_path / f"{i}.png") for i in range(3)]

    def fn(path: Path) -> int:
        if path.name == "1.png":
            raise ImageError(path, "not wanted")
        return int(path.stem)

    results, errors = scan_images([Sample(p, ("a",), TRAIN) for p in paths], fn=fn, progress=True)
    assert results == {paths[0]: 0, paths[2]: 2}
    assert errors == {paths[1]: "not wanted"}
    with pytest.raises(ZeroDivisionError):  # bugs in fn are not mistaken for bad files
        scan_images(paths, fn=lambda p: 1 / 0)


def test_check_table_removes_bad_files_and_counts_conversions(split_folder, make_image):
    (split_folder / "train/cat/trunc.jpg").write_bytes((split_folder / "train/cat/cat_0.jpg").read_bytes()[:200])
    (split_folder / "train/dog/page.jpg").write_text("<html><body>404</body></html>")
    (split_folder / "train/dog/empty.jpg").write_bytes(b"")
    make_image(split_folder / "train/dog/gray.png", color=90, mode="L")
    make_image(split_folder / "valid/cat/cmyk.jpg", color=(0, 0, 0, 0), mode="CMYK")
    table, report = check_table(from_folder(split_folder))
    names = {s.path.name for s in table.samples}
    assert {"trunc.jpg", "page.jpg", "empty.jpg"}.isdisjoint(names) and "gray.png" in names
    skipped = {Path(p).name: why for p, why in table.skipped}
    assert skipped["page.jpg"].startswith("is an HTML file")
    assert report.checked == 17 and len(report.unusable) == 3
    assert report.conversions == {"grayscale": 1, "CMYK": 1}
    lines = report.lines()
    assert any("3 files cannot be used" in line for line in lines)
    assert "converted to RGB: 1 CMYK, 1 grayscale" in lines


def test_leakage_and_duplicates(split_folder):
    shutil.copy(split_folder / "train/cat/cat_0.jpg", split_folder / "valid/cat/copy.jpg")
    shutil.copy(split_folder / "train/dog/dog_0.jpg", split_folder / "train/dog/again.jpg")
    shutil.copy(split_folder / "train/dog/dog_1.jpg", split_folder / "train/cat/mislabelled.jpg")
    table, report = check_table(from_folder(split_folder))
    assert len(report.leakage) == 1
    assert sorted(report.leakage[0].files) == ["train/cat/cat_0.jpg", "valid/cat/copy.jpg"]
    assert len(report.duplicates) == 2
    assert len(report.label_conflicts) == 1
    assert report.lines()[0].startswith("LEAKAGE: 1 validation/test files are identical to training files")
    data = json.loads(report.to_json())
    assert data["leakage"][0]["splits"] == ["train", "valid"]


def test_class_left_without_training_images(split_folder):
    for p in (split_folder / "train/dog").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DataError, match=r"class\(es\) 'dog' have no usable training images \(4 could not be decoded\)"):
        check_table(from_folder(split_folder))


def test_class_without_validation_images_is_reported(split_folder):
    for p in (split_folder / "valid/dog").iterdir():
        p.write_text("not an image")
    _, report = check_table(from_folder(split_folder))
    assert report.classes_without_valid == ["dog"]
    assert any("no validation images for class(es) 'dog'" in line for line in report.lines())


def test_nothing_usable(tmp_path):
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match="none of the 4 images can be used"):
        check_table(from_folder(tmp_path))


def test_summary_single_label(split_folder, make_image):
    for i in range(10):
        make_image(split_folder / f"train/cat/more_{i}.jpg")
    table, report = check_table(from_folder(split_folder))
    summary = summarize(table, report)
    assert summary.counts[TRAIN] == {"cat": 14, "dog": 4}
    assert summary.images == {TRAIN: 18, VALID: 4}
    assert summary.imbalance_ratio == 3.5 and summary.imbalanced
    json.dumps(summary.to_dict())
    assert "largest / smallest training class: 3.5 (imbalanced" in summary.lines()[0]
    out = io.StringIO()
    data_summary(Console(file=out, width=100), summary, summary.text())
    text = out.getvalue()
    assert "cat" in text and "14" in text and "imbalanced" in text


def test_summary_multi_label_and_groups(tmp_path, make_image):
    rows = [(("a", "b"), "g1"), (("a",), "g1"), ((), "g2"), (("b",), "g3"), (("a", "b"), "g4"), (("a",), "g4")]
    samples = [Sample(make_image(tmp_path / f"{i}.png"), labels, VALID if group == "g4" else TRAIN, group)
               for i, (labels, group) in enumerate(rows)]
    table = SampleTable(samples, ["a", "b"], multi_label=True, root=tmp_path)
    summary = summarize(table)
    assert summary.cooccurrence == [[4, 2], [2, 3]]
    assert summary.empty_label_images == {TRAIN: 1, VALID: 0}
    assert summary.groups == {TRAIN: 3, VALID: 1}
    assert "most frequent label pairs: a+b (2)" in summary.lines()
    data_summary(Console(file=io.StringIO()), summary, summary.text())


def test_conversion_counts_from_custom_fn(split_folder):
    class Cached:
        def __init__(self, path):
            self.info = ImageInfo("PNG", "L", (16, 16))
            self.pixels = np.zeros(3)

    _, report = check_table(from_folder(split_folder), fn=Cached)
    assert report.conversions == {"grayscale": 12}


def test_rgba_counted_as_transparency(tmp_path, make_dataset):
    root = make_dataset(tmp_path, {"a": 3, "b": 3}, ext=".png")
    Image.new("RGBA", (16, 16), (1, 2, 3, 0)).save(root / "a" / "alpha.png")
    _, report = check_table(from_folder(root))
    assert report.conversions == {"with transparency": 1}


def test_the_summary_table_is_safe_with_odd_class_names(tmp_path, make_image):
    odd = ["[bold]x", os.fsdecode(b"caf\xe9")]
    samples = [Sample(make_image(tmp_path / f"{i}.png"), (odd[i % 2],), TRAIN if i < 4 else VALID) for i in range(6)]
    out = io.StringIO()
    summary = summarize(SampleTable(samples, sorted(odd), root=tmp_path))
    data_summary(Console(file=out, width=100), summary, summary.text())
    assert "[bold]x" in out.getvalue() and "caf\\xe9" in out.getvalue()
