"""Data sources: folders, CSV files and file-name patterns read into a SampleTable, and the split."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from imgclf.data.samples import TEST, TRAIN, VALID, Sample
from imgclf.data.sources import from_csv, from_folder, from_pattern, load_source, random_split
from imgclf.errors import DataError


def _labels(table) -> dict[str, tuple[str, ...]]:
    return {p.name: s.labels for s in table.samples for p in [s.path]}


def _splits(table) -> dict[str, str]:
    return {s.path.name: s.split for s in table.samples}


def _skipped(table) -> dict[str, str]:
    return {Path(p).name: why for p, why in table.skipped}


# --- folders ----------------------------------------------------------------------------------


def test_folder_random_split(class_folder):
    table = from_folder(class_folder)
    assert table.classes == ["bird", "cat", "dog"]
    assert len(table.samples) == 15 and not table.multi_label
    assert all(s.path.is_absolute() and s.path.is_file() for s in table.samples)
    counts = table.counts()
    for c in table.classes:
        assert counts[TRAIN][c] >= 1 and counts[VALID][c] >= 1
    assert counts[VALID] == Counter({"cat": 1, "dog": 1, "bird": 1})  # round(0.2 * n) per class


def test_folder_split_is_seeded(class_folder):
    assert _splits(from_folder(class_folder, seed=1)) == _splits(from_folder(class_folder, seed=1))
    seeds = {tuple(sorted(_splits(from_folder(class_folder, seed=s)).items())) for s in range(5)}
    assert len(seeds) > 1


def test_folder_with_split_folders(tmp_path, make_dataset):
    root = make_dataset(tmp_path, {"train/cat": 3, "train/dog": 3, "val/cat": 1, "val/dog": 1, "test/cat": 1})
    table = from_folder(root)
    assert table.classes == ["cat", "dog"]
    assert Counter(s.split for s in table.samples) == {TRAIN: 6, VALID: 2, TEST: 1}
    assert all(s.split == TEST for s in table.samples if "test" in s.path.parts)


def test_folder_train_and_test_only(tmp_path, make_dataset):
    root = make_dataset(tmp_path, {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    table = from_folder(root)
    assert Counter(s.split for s in table.samples) == {TRAIN: 4, VALID: 2}
    assert any("test/" in n and "validation" in n for n in table.notes)


def test_class_named_train_is_not_a_split(tmp_path, make_dataset):
    root = make_dataset(tmp_path, {"train": 3, "car": 3})
    assert from_folder(root).classes == ["car", "train"]


def test_folder_walk_details(tmp_path, make_dataset, make_image):
    root = make_dataset(tmp_path, {"cat": 3, "dog": 2, "dog/puppies": 2, "empty": 0})
    make_image(root / ".hidden" / "x.jpg")
    make_image(root / "cat" / ".ipynb_checkpoints" / "x.jpg")
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "cat" / "notes.docx").write_text("hello")
    (root / "cat" / "IMG_1.HEIC").write_bytes(b"heic")
    make_image(root / "loose.jpg")
    (root / "cat" / "loop").symlink_to(root / "cat")  # a link back to an ancestor
    (root / "dog" / "a").symlink_to(root / "dog" / "b")  # a loop the OS refuses to resolve
    (root / "dog" / "b").symlink_to(root / "dog" / "a")
    (root / "dog" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    table = from_folder(root)
    assert table.classes == ["cat", "dog"]
    assert len(table.split(TRAIN)) + len(table.split(VALID)) == 7  # nested dog/puppies belong to dog
    assert all(s.labels == ("dog",) for s in table.samples if "puppies" in s.path.parts)
    assert all(".hidden" not in s.path.parts and ".ipynb_checkpoints" not in s.path.parts for s in table.samples)
    skipped = _skipped(table)
    assert skipped["notes.docx"] == "not an image file (.docx)"
    assert "HEIC" in skipped["IMG_1.HEIC"]
    assert "not inside a class folder" in skipped["loose.jpg"]
    assert "symbolic link loop" in skipped["a"]
    assert "broken symbolic link" in skipped["gone.jpg"]
    assert ".DS_Store" not in skipped
    assert any("'empty'" in n and "no images" in n for n in table.notes)


def test_unreadable_folder_is_recorded(tmp_path, make_dataset, monkeypatch):
    root = make_dataset(tmp_path, {"cat": 2, "dog": 2, "dog/locked": 1})
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    table = from_folder(root)
    assert "permission denied" in _skipped(table)["locked"]
    assert len(table.samples) == 4


def test_non_utf8_file_name(tmp_path, make_dataset, make_image):
    root = make_dataset(tmp_path, {"cat": 2, "dog": 2})
    make_image(root / "cat" / os.fsdecode(b"caf\xe9.jpg"))
    table = from_folder(root)
    names = {s.path.name for s in table.samples}
    assert os.fsdecode(b"caf\xe9.jpg") in names
    assert len(table.samples) == 5


# --- CSV --------------------------------------------------------------------------------------


@pytest.fixture
def flat(tmp_path, make_image) -> Path:
    """tmp_path/img/0.jpg ... 9.jpg (16x16)."""
    for i in range(10):
        make_image(tmp_path / "img" / f"{i}.jpg")
    return tmp_path


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_single_label_with_header(flat):
    rows = "".join(f"img/{i}.jpg,{'cat' if i < 5 else 'dog'}\n" for i in range(10))
    _write(flat / "labels.csv", "filename,label\n" + rows)
    table = from_csv(flat, "labels.csv")
    assert table.classes == ["cat", "dog"] and not table.multi_label
    assert _labels(table)["3.jpg"] == ("cat",)
    assert {s.split for s in table.samples} == {TRAIN, VALID}


def test_csv_without_header_bom_crlf_blank_lines_extra_columns(flat):
    rows = "".join(f"img/{i}.jpg,{'cat' if i % 2 else 'dog'},extra{i}\r\n\r\n" for i in range(10))
    _write(flat / "labels.csv", "\ufeff" + rows)
    table = from_csv(flat, flat / "labels.csv")
    assert table.classes == ["cat", "dog"]
    assert len(table.samples) == 10
    assert _labels(table)["1.jpg"] == ("cat",)


def test_csv_named_columns_in_another_order(flat):
    rows = "".join(f"x{i},{'b' if i < 5 else 'a'},img/{i}.jpg\n" for i in range(10))
    _write(flat / "l.csv", "id_other,tags,path\n" + rows)
    table = from_csv(flat, "l.csv")
    assert table.classes == ["a", "b"] and len(table.samples) == 10
    assert from_csv(flat, "l.csv", image_col="path", label_col=1).classes == ["a", "b"]
    with pytest.raises(DataError, match="no column named 'nope'"):
        from_csv(flat, "l.csv", label_col="nope")


def test_csv_multi_label_detected(flat):
    labels = ["cat dog", "cat", "dog", "", "cat  dog", "dog", "bird", "cat", "dog", "bird cat"]
    rows = "".join(f"img/{i}.jpg,{lab}\n" for i, lab in enumerate(labels))
    _write(flat / "labels.csv", "image,labels\n" + rows)
    table = from_csv(flat, "labels.csv")
    assert table.multi_label
    assert table.classes == ["bird", "cat", "dog"]
    got = _labels(table)
    assert got["0.jpg"] == ("cat", "dog") and got["3.jpg"] == () and got["4.jpg"] == ("cat", "dog")
    assert any(n.startswith("multi-label detected: 3 files have several labels (e.g. row 2: "
                            "'cat dog')") and "--single-label" in n for n in table.notes)


def test_csv_forced_single_label_keeps_spaces_and_skips_blank(flat):
    labels = ["golden retriever", "beagle", "", "beagle", "golden retriever"] * 2
    rows = "".join(f"img/{i}.jpg,{lab}\n" for i, lab in enumerate(labels))
    _write(flat / "labels.csv", "file,class\n" + rows)
    table = from_csv(flat, "labels.csv", multi_label=False)
    assert table.classes == ["beagle", "golden retriever"] and not table.multi_label
    assert _skipped(table)["2.jpg"] == "labels.csv row 4 has a blank label"
    assert len(table.samples) == 8


def test_csv_other_delimiter(flat):
    rows = "".join(f"img/{i}.jpg;{'a|b' if i == 0 else 'a' if i % 2 else 'b'}\n" for i in range(10))
    _write(flat / "labels.csv", "file;labels\n" + rows)
    table = from_csv(flat, "labels.csv", label_delim="|")
    assert table.multi_label and _labels(table)["0.jpg"] == ("a", "b")


def test_csv_one_hot(flat):
    rows = "".join(f"img/{i}.jpg,{i % 2},{int(i < 5)},{i}\n" for i in range(10))
    _write(flat / "labels.csv", "image,cat,dog,notes\n" + rows)
    table = from_csv(flat, "labels.csv", label_cols="auto")
    assert table.multi_label and table.classes == ["cat", "dog"]
    got = _labels(table)
    assert got["1.jpg"] == ("cat", "dog") and got["6.jpg"] == () and got["2.jpg"] == ("dog",)
    explicit = from_csv(flat, "labels.csv", label_cols=["cat", "dog"])
    assert _labels(explicit) == got


def test_csv_split_column_words(flat):
    split = ["train"] * 6 + ["valid", "val", "test", "train"]
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'},{s}\n" for i, s in enumerate(split))
    _write(flat / "labels.csv", "file,label,split\n" + rows)
    table = from_csv(flat, "labels.csv")
    assert Counter(s.split for s in table.samples) == {TRAIN: 7, VALID: 2, TEST: 1}
    assert _splits(table)["8.jpg"] == TEST


def test_csv_is_valid_boolean(flat):
    flags = ["False", "true", "0", "no", "yes", "1", "false", "False", "FALSE", "False"]
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'},{f}\n" for i, f in enumerate(flags))
    _write(flat / "labels.csv", "file,label,is_valid\n" + rows)
    table = from_csv(flat, "labels.csv")
    assert {n for n, s in _splits(table).items() if s == VALID} == {"1.jpg", "4.jpg", "5.jpg"}


def test_csv_bad_split_value(flat):
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'},{'holdout' if i == 3 else 'train'}\n" for i in range(10))
    _write(flat / "labels.csv", "file,label,part\n" + rows)
    with pytest.raises(DataError, match=r"labels.csv row 5: split value 'holdout'"):
        from_csv(flat, "labels.csv", split_col="part")


def test_csv_missing_files_are_skipped_not_fatal(flat):
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'}\n" for i in range(10)) + "img/99.jpg,a\n"
    _write(flat / "labels.csv", "file,label\n" + rows)
    table = from_csv(flat, "labels.csv")
    assert len(table.samples) == 10
    assert _skipped(table)["99.jpg"] == "listed in labels.csv row 12 but not found"


def test_csv_ids_without_extension_and_groups(flat):
    rows = "".join(f"img/{i},{'a' if i % 2 else 'b'},site{i % 5}\n" for i in range(10))
    _write(flat / "labels.csv", "id,label,site\n" + rows)
    table = from_csv(flat, "labels.csv", group_col="site")
    assert len(table.samples) == 10 and all(s.path.suffix == ".jpg" for s in table.samples)
    assert _no_group_straddles(table.samples)


def test_csv_duplicate_row(flat):
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'}\n" for i in range(10))
    _write(flat / "labels.csv", "file,label\n" + rows + "img/0.jpg,b\n")
    table = from_csv(flat, "labels.csv")
    assert _labels(table)["0.jpg"] == ("b",) and len(table.samples) == 10


def test_csv_repeated_row_with_another_label_is_a_conflict(flat):
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'}\n" for i in range(10))
    _write(flat / "labels.csv", "file,label\n" + rows + "img/0.jpg,a\n")
    with pytest.raises(DataError, match=r"1 files are listed with different labels \(img/0.jpg: "
                       r"row 2 says 'b', row 12 says 'a'\).*--multi-label"):
        from_csv(flat, "labels.csv")
    merged = from_csv(flat, "labels.csv", multi_label=True)
    assert _labels(merged)["0.jpg"] == ("a", "b")
    assert any("union of its rows' labels (long format)" in n for n in merged.notes)


def test_csv_long_format_merges_labels(flat):
    rows = [f"img/{i}.jpg,{lab}\n" for i in range(10) for lab in (["a", "b"] if i < 4 else ["ab"[i % 2]])]
    _write(flat / "labels.csv", "file,label\n" + "".join(rows))
    table = from_csv(flat, "labels.csv")
    assert table.multi_label and _labels(table)["0.jpg"] == ("a", "b")
    assert _labels(table)["5.jpg"] == ("b",) and len(table.samples) == 10


@pytest.mark.parametrize("label", ["milk bottle", "Object Type"])
def test_csv_words_in_a_label_are_not_taken_for_several_labels(flat, label):
    """A class name with a space, or an unrecognised header row read as data."""
    rows = "".join(f"img/{i}.jpg,{label if i == 0 or label == 'milk bottle' and i % 2 else 'can'}\n"
                   for i in range(10))
    _write(flat / "labels.csv", rows)
    with pytest.raises(DataError, match="cannot tell whether row 1: .*--single-label.*--multi-label"):
        from_csv(flat, "labels.csv")
    if label == "milk bottle":
        table = from_csv(flat, "labels.csv", multi_label=False)
        assert table.classes == ["can", "milk bottle"] and not table.multi_label


def test_csv_header_named_by_the_user_is_taken_as_header(flat):
    rows = "".join(f"img/{i}.jpg,{'ab'[i % 2]}\n" for i in range(10))
    _write(flat / "labels.csv", "Picture,Object Kind\n" + rows)
    table = from_csv(flat, "labels.csv", image_col="Picture", label_col="Object Kind")
    assert table.classes == ["a", "b"] and len(table.samples) == 10


@pytest.mark.parametrize("name", ["RELATIVE", "../../etc/passwd", "ABSOLUTE"])
def test_csv_names_outside_the_data_folder_are_refused(flat, tmp_path, make_image, name):
    outside = make_image(tmp_path.parent / f"{tmp_path.name}-outside.jpg")
    name = {"ABSOLUTE": str(outside), "RELATIVE": f"../{outside.name}"}.get(name, name)
    rows = "".join(f"img/{i}.jpg,{'ab'[i % 2]}\n" for i in range(10)) + f"{name},a\n"
    _write(flat / "labels.csv", "file,label\n" + rows)
    with pytest.raises(DataError, match=r"1 rows name files outside the data folder .*row 12: "
                       r".*--allow-outside-data"):
        from_csv(flat, "labels.csv")
    if name != "../../etc/passwd":
        table = from_csv(flat, "labels.csv", allow_outside=True)
        assert outside.resolve() in {s.path.resolve() for s in table.samples}


# --- patterns ---------------------------------------------------------------------------------


def test_pattern(tmp_path, make_image):
    for name in ["monkey_prosimian_9780.jpg", "monkey_prosimian_1.jpg", "cat_1.jpg", "cat_22.jpg", "readme_x.jpg"]:
        make_image(tmp_path / "images" / name)
    table = from_pattern(tmp_path, r"(.+)_\d+\.jpg$")
    assert table.classes == ["cat", "monkey_prosimian"]
    assert "does not match the label pattern" in _skipped(table)["readme_x.jpg"]
    with pytest.raises(DataError, match="no \\(...\\) group"):
        from_pattern(tmp_path, r".+\.jpg")


def test_pattern_falls_back_to_relative_path(tmp_path, make_image):
    for cls in ("cat", "dog"):
        for i in range(2):
            make_image(tmp_path / cls / f"{i}.jpg")
    table = from_pattern(tmp_path, r"^(\w+)/")
    assert table.classes == ["cat", "dog"]


# --- split ------------------------------------------------------------------------------------


def _samples(counts: dict[str, int], groups: int | None = None) -> list[Sample]:
    out = []
    for c, n in counts.items():
        for i in range(n):
            group = f"g{(i + len(c)) % groups}" if groups else None
            out.append(Sample(Path(f"/d/{c}/{i}.jpg"), (c,), TRAIN, group))
    return out


def _no_group_straddles(samples: list[Sample]) -> bool:
    sides: dict[str, set] = {}
    for s in samples:
        sides.setdefault(s.group, set()).add(s.split)
    return all(len(v) == 1 for g, v in sides.items() if g is not None)


def test_random_split_stratified_and_reproducible():
    samples = _samples({"a": 50, "b": 10, "c": 2, "d": 3})
    out = random_split(samples, 0.2, seed=7)
    assert out == random_split(list(reversed(samples)), 0.2, seed=7)[::-1]  # order-independent
    valid = Counter(s.labels[0] for s in out if s.split == VALID)
    assert valid == {"a": 10, "b": 2, "c": 1, "d": 1}
    assert [s.path for s in out] == [s.path for s in samples]


def test_random_split_single_image_class():
    with pytest.raises(DataError, match="class 'can' has 1 image; at least 2 are needed to split"):
        random_split(_samples({"a": 5, "can": 1}), 0.2, 0)


def test_random_split_bad_pct():
    with pytest.raises(DataError, match="valid_pct"):
        random_split(_samples({"a": 5}), 1.5, 0)


def test_group_split_keeps_groups_whole():
    samples = _samples({"a": 40, "b": 30, "c": 12}, groups=8)
    out = random_split(samples, 0.25, seed=3)
    assert _no_group_straddles(out)
    valid = Counter(s.labels[0] for s in out if s.split == VALID)
    train = Counter(s.labels[0] for s in out if s.split == TRAIN)
    assert all(valid[c] and train[c] for c in "abc")
    assert 0.1 < sum(valid.values()) / len(out) < 0.4


def test_group_split_single_group_class_is_an_error():
    samples = _samples({"a": 6}, groups=3) + [Sample(Path(f"/d/b/{i}.jpg"), ("b",), TRAIN, "only") for i in range(3)]
    with pytest.raises(DataError, match="class 'b': all 3 images are in one group"):
        random_split(samples, 0.2, 0)


def test_multi_label_split():
    samples = [Sample(Path(f"/d/{i}.jpg"), labels, TRAIN)
               for i, labels in enumerate([("a",), ("a", "b"), ("b",), (), ("c", "a"), ("c",)] * 5)]
    out = random_split(samples, 0.2, 0, multi_label=True)
    valid = Counter(lab for s in out if s.split == VALID for lab in s.labels)
    assert all(valid[c] >= 1 for c in "abc")
    assert any(s.split == VALID and not s.labels for s in out)


def test_group_pattern(tmp_path, make_image):
    root = tmp_path
    for cls in ("cat", "dog"):
        for site in range(4):
            for i in range(2):
                make_image(root / cls / f"site{site}_{i}.jpg")
    table = from_folder(root, group_pattern=r"(site\d+)_")
    assert {s.group for s in table.samples} == {f"site{i}" for i in range(4)}
    assert _no_group_straddles(table.samples)


# --- dispatch ---------------------------------------------------------------------------------


def test_load_source_errors(tmp_path, make_dataset):
    with pytest.raises(DataError, match="does not exist"):
        load_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images found"):
        load_source(tmp_path / "empty")
    make_dataset(tmp_path / "one", {"cat": 3})
    with pytest.raises(DataError, match=r"only one class \('cat'\)"):
        load_source(tmp_path / "one")
    make_dataset(tmp_path / "two", {"cat": 3, "dog": 3})
    with pytest.raises(DataError, match="does not apply to folder"):
        load_source(tmp_path / "two", label_delim=",")


def test_load_source_dispatch(class_folder, flat):
    assert load_source(class_folder, valid_pct=0.3, seed=1, group_pattern=None).classes == ["bird", "cat", "dog"]
    rows = "".join(f"img/{i}.jpg,{'a' if i % 2 else 'b'}\n" for i in range(10))
    csv_path = _write(flat / "labels.csv", "file,label\n" + rows)
    assert load_source(flat, csv="labels.csv").classes == ["a", "b"]
    assert load_source(csv_path).classes == ["a", "b"]  # the CSV alone names the root
    assert load_source(class_folder, label_pattern=r"^([a-z]+)_\d").classes == ["bird", "cat", "dog"]


def _random_csv(rng, root: Path) -> tuple[str, bytes, dict[str, tuple[str, ...]], bool]:
    """A labels CSV as people write them, and what it says: {file: labels} and the task."""
    import csv as csv_module
    import io

    multi = rng.random() < 0.4
    spaced = not multi and rng.random() < 0.3  # class names with a space
    classes = ([f"milk bottle {k}" for k in range(3)] if spaced
               else rng.sample(["cat", "dog", "bird", "fish", "can"], rng.randint(2, 4)))
    files = [f"img/{i}.jpg" for i in range(rng.randint(8, 10))]
    truth = {}
    for i, f in enumerate(files):
        if multi:
            # Every label recurs alone and in combinations, as in real multi-label data.
            k = 1 + (i % 3 == 0) + (i % 5 == 0)
            truth[f] = tuple(sorted({classes[(i + j) % len(classes)] for j in range(k)}))
        else:
            truth[f] = (classes[i % len(classes)],)
    delim = rng.choice([",", ";", "\t"])
    buf = io.StringIO()
    writer = csv_module.writer(buf, delimiter=delim, quoting=rng.choice(
        [csv_module.QUOTE_MINIMAL, csv_module.QUOTE_ALL]), lineterminator=rng.choice(["\n", "\r\n"]))
    if rng.random() < 0.6:
        writer.writerow(["filename", "labels"])
    rows = [(f, " ".join(labels)) for f, labels in truth.items()]
    rows += rng.sample(rows, rng.randint(0, 3))  # exact duplicate rows
    rng.shuffle(rows)
    for row in rows:
        writer.writerow(row)
    data = buf.getvalue().encode()
    if rng.random() < 0.3:
        data = b"\xef\xbb\xbf" + data
    return ("labels.tsv" if delim == "\t" else "labels.csv"), data, truth, multi


def test_random_csvs_give_what_their_rows_say_or_stop_with_a_message(flat):
    import random

    rng = random.Random(0)
    loaded = 0
    for case in range(150):
        name, data, truth, multi = _random_csv(rng, flat)
        (flat / name).write_bytes(data)
        try:
            table = from_csv(flat, name)
        except DataError as e:
            assert "--single-label" in str(e) or "--multi-label" in str(e), (case, str(e))
            continue
        finally:
            (flat / name).unlink()
        loaded += 1
        assert table.multi_label == multi, (case, data[:200])
        assert len(table.samples) == len(truth), case
        assert table.classes == sorted({c for labels in truth.values() for c in labels}), case
        assert {f"img/{s.path.name}": s.labels for s in table.samples} == truth, case
    assert loaded >= 120  # stopping is for the ambiguous files only


def test_training_and_testing_folders_are_the_split(tmp_path, make_dataset):
    make_dataset(tmp_path, {"training/cat": 4, "training/dog": 4, "testing/cat": 2, "testing/dog": 2})
    table = from_folder(tmp_path)
    assert table.classes == ["cat", "dog"]
    assert Counter(s.split for s in table.samples) == {"train": 8, "valid": 4}
    assert any("'testing/' is used for validation" in n for n in table.notes)


def test_folders_of_folders_never_become_classes_silently(tmp_path, make_dataset):
    make_dataset(tmp_path / "folds", {"fold1/cat": 3, "fold1/dog": 3, "fold2/cat": 3, "fold2/dog": 3})
    with pytest.raises(DataError, match="'fold1', 'fold2' each hold the same folders \\(cat, dog\\)"):
        from_folder(tmp_path / "folds")
    make_dataset(tmp_path / "nested", {"cat/2019": 3, "cat/2020": 3, "dog": 4})
    table = from_folder(tmp_path / "nested")
    assert table.classes == ["cat", "dog"]
    assert "class folder 'cat' holds only folders (2019, 2020): all their images are labelled 'cat'" in table.notes


def test_a_group_pattern_matching_no_file_is_an_error(tmp_path, make_dataset):
    make_dataset(tmp_path, {"cat": 4, "dog": 4})
    with pytest.raises(DataError, match=re.escape("group pattern 'site_(\\d+)' matches none of the 8 files")):
        from_folder(tmp_path, group_pattern=r"site_(\d+)")


def test_notes_beside_the_images_are_not_reported_as_skipped(tmp_path, make_dataset):
    make_dataset(tmp_path, {"cat": 4, "dog": 4})
    for name in ("SOURCE.md", "cat/README.txt", "labels.csv"):
        (tmp_path / name).write_text("notes")
    (tmp_path / "cat" / "notes.docx").write_text("not an image")
    table = from_folder(tmp_path)
    assert [p.name for p, _ in table.skipped] == ["notes.docx"]
