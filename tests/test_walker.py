"""The one directory walker (`imgclf.data.files.list_images`) behind train, predict, the ONNX
predictor and the mining pool: linked class folders, link loops, FIFOs and devices."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import make_color_dataset
from imgclf.commands.mine import pool as mining_pool
from imgclf.data.files import list_images
from imgclf.data.sources import from_folder
from imgclf.deploy import exported
from imgclf.deploy.bundle import load as load_bundle

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="symbolic links need a POSIX file system")
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no os.mkfifo on this platform")


@pytest.fixture
def linked_data(tmp_path: Path) -> Path:
    """data/<class> are symbolic links to the real class folders elsewhere, plus a link loop."""
    real = make_color_dataset(tmp_path / "real", per_class=3, classes=("red", "green"))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("red", "green"):
        (data / name).symlink_to(real / name, target_is_directory=True)
    (real / "red" / "loop").symlink_to(real, target_is_directory=True)  # back up: a loop
    return data


@needs_symlinks
def test_every_lister_follows_linked_class_folders(linked_data):
    files = list_images([linked_data]).files
    assert len(files) == 6 and all(p.suffix == ".jpg" for p in files)
    assert [p.parent.name for p in files] == ["green"] * 3 + ["red"] * 3  # sorted, depth first
    table = from_folder(linked_data)
    assert sorted(s.path for s in table.samples) == sorted(files)
    # The exported-model predictors (ONNX, OpenVINO) and the mining pool list the same files.
    assert exported.expand([str(linked_data)]) == files
    pool = mining_pool._list_images(linked_data, "--pool")
    assert sorted(pool) == sorted(p.resolve() for p in files)


@needs_symlinks
def test_predict_finds_images_in_linked_class_folders(tiny_run, linked_data):
    res = load_bundle(tiny_run.path).predict(linked_data)
    assert len(res.paths) == 6 and not res.errors
    assert res.probs.shape == (6, len(res.classes))


@needs_fifo
def test_predict_skips_a_fifo_and_a_device_instead_of_hanging(tiny_run, tmp_path, caplog):
    folder = make_color_dataset(tmp_path / "data", per_class=2, classes=("red",)) / "red"
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block forever
    if os.path.exists("/dev/zero"):
        (folder / "zero.jpg").symlink_to("/dev/zero")  # reading it never ends
    listed = list_images([folder])
    assert [p.name for p in listed.files] == ["red_000.jpg", "red_001.jpg"]
    assert ("pipe.jpg", "not a regular file") in [(p.name, why) for p, why in listed.skipped]
    assert "pipe.jpg: skipped (not a regular file)" in caplog.text

    bundle = load_bundle(tiny_run.path)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(res=bundle.predict(folder)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "predict hung on a FIFO or device in the folder"
    assert [p.name for p in out["res"].paths] == ["red_000.jpg", "red_001.jpg"]
    # Named directly, a FIFO is skipped too, not opened.
    assert list_images([folder / "pipe.jpg"]).files == []


def test_predict_says_which_files_in_a_folder_it_left_out(tiny_run, tmp_path, caplog):
    folder = make_color_dataset(tmp_path / "data", per_class=2, classes=("red",)) / "red"
    (folder / "red_000.jpg").rename(folder / "photo.dat")  # an image under a name predict skips
    bundle = load_bundle(tiny_run.path)
    res = bundle.predict(folder)
    assert [p.name for p in res.paths] == ["red_001.jpg"]
    assert "1 files in the folders given are not named like images" in caplog.text
    assert "photo.dat" in caplog.text
    assert [p.name for p in bundle.predict(folder / "photo.dat").paths] == ["photo.dat"]
