"""A corpus of bad inputs through the real command line: train, evaluate and predict.

One folder holds good images and every kind of bad file at once; the model is trained on it once
(a subprocess, as a user runs it) and evaluated and predicted on it. What must hold: each bad file
gets a clear message naming it, every valid image is used, nothing prints a traceback, and the exit
code is non-zero only where nothing useful can be done. Inputs that leave nothing to do (one
class, no images, a broken bundle, wrong weights) are separate small cases.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_color_dataset

TINY = ["--model", "test_efficientnet", "--no-pretrained", "--size", "32", "--epochs", "1",
        "--freeze-epochs", "0", "--batch-size", "8", "--lr", "0.01", "--precision", "32"]
ROOT_USER = os.geteuid() == 0

# file (relative to the corpus) -> words its message must contain. The source skips some before
# decoding (not images by name, links that lead nowhere); decoding refuses the rest.
BAD = {
    "train/red/truncated.jpg": "truncated or corrupt JPEG",
    "train/red/empty.jpg": "file is empty",
    "train/red/page.jpg": "is an HTML file",
    "train/red/vector.png": "is an SVG file",
    "train/red/drawing.svg": "not an image file (.svg)",
    "train/red/bomb.png": "decompression bomb",
    "train/red/pixel.png": "too small",
    "train/green/loop.jpg": "symbolic link loop",
    "train/green/dangling.jpg": "broken symbolic link",
    "train/green/notes.docx": "not an image file (.docx)",
    "valid/green/empty.jpg": "file is empty",
    **({} if ROOT_USER else {"train/green/locked.jpg": "permission denied"}),
}
# Unusual but valid: every one of these must be trained on (or validated on: the odd names are
# in valid/, so predictions.csv and the report carry them).
SPECIAL = ["train/green/animated.gif", "train/green/deep16.tif", "train/green/cmyk.jpg",
           "train/green/palette.png", "train/green/rotated.jpg", "train/red/dup_a.jpg",
           "train/red/dup_b.jpg", "valid/red/with space ünï 猫.jpg",
           *(["train/green/locked.jpg"] if ROOT_USER else [])]
NON_UTF8 = b"valid/red/caf\xe9.jpg"
TRAIN_PER_CLASS, VALID_PER_CLASS = 10, 3
N_VALID = 2 * (TRAIN_PER_CLASS + VALID_PER_CLASS) + len(SPECIAL) + 1  # + the non-UTF-8 name


def noise(seed: int, size=(40, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge picture."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[12:29] = ihdr
    data[29:33] = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
    return bytes(data)


def build_corpus(root: Path) -> Path:
    make_color_dataset(root / "train", per_class=TRAIN_PER_CLASS + VALID_PER_CLASS,
                       classes=("red", "green"))
    for cls in ("red", "green"):
        (root / "valid" / cls).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS, TRAIN_PER_CLASS + VALID_PER_CLASS):
            name = f"{cls}/{cls}_{i:03d}.jpg"
            (root / "train" / name).rename(root / "valid" / name)
    red, green = root / "train" / "red", root / "train" / "green"
    good = jpeg_bytes(noise(1))
    (red / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (red / "empty.jpg").write_bytes(b"")
    (red / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
           '<rect width="40" height="40"/></svg>')
    (red / "vector.png").write_text(svg)
    (red / "drawing.svg").write_text(svg)
    (red / "bomb.png").write_bytes(bomb_png())
    Image.new("RGB", (1, 1), (9, 9, 9)).save(red / "pixel.png")
    os.symlink("loop.jpg", green / "loop.jpg")
    os.symlink("gone.jpg", green / "dangling.jpg")
    (green / "notes.docx").write_text("photographer's notes")
    (green / "locked.jpg").write_bytes(jpeg_bytes(noise(2)))
    (green / "locked.jpg").chmod(0)

    frames = [noise(3 + i) for i in range(3)]
    frames[0].save(green / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    deep = (np.random.default_rng(4).integers(0, 65535, (40, 40))).astype(np.uint16)
    Image.fromarray(deep).save(green / "deep16.tif")
    assert Image.open(green / "deep16.tif").mode.startswith("I;16")
    noise(5).convert("CMYK").save(green / "cmyk.jpg")
    palette = noise(6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(green / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(7, (40, 30)).save(green / "rotated.jpg", exif=exif)
    dup = jpeg_bytes(noise(8))
    (red / "dup_a.jpg").write_bytes(dup)
    (red / "dup_b.jpg").write_bytes(dup)
    noise(9).save(root / "valid" / "red" / "with space ünï 猫.jpg")
    (root / "valid" / "green" / "empty.jpg").write_bytes(b"")
    noise(10).save(os.path.join(os.fsencode(root), NON_UTF8), "JPEG")

    # Clutter no one means as data: silently ignored, never counted.
    for hidden in (root / ".ipynb_checkpoints", red / ".ipynb_checkpoints"):
        hidden.mkdir()
        noise(11).save(hidden / "red-checkpoint.jpg")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (red / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "blue").mkdir()  # an empty class folder
    return root


def flat(text: str) -> str:
    """Output with line wrapping undone, for substring checks."""
    return " ".join(text.split())


def imgclf(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf.cli", *map(os.fsdecode, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "1000", **(env or {})})


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """`imgclf ARGS` through the real entry point, in this process: (exit code, stdout, stderr)."""
    from imgclf import cli

    old = sys.argv
    sys.argv = ["imgclf", *map(os.fsdecode, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("bad") / "corpus")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """The one training run on the corpus, as a user would start it."""
    out = tmp_path_factory.mktemp("runs")
    r = imgclf("train", corpus, *TINY, "--out", out, "--name", "corpus",
               env={"IMGCLF_CACHE_DIR": str(out / "cache")})
    return out / "corpus", r


# --- train ---------------------------------------------------------------------------------


def test_train_succeeds_without_traceback(trained):
    run, r = trained
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert (run / "model" / "model.json").is_file() and (run / "report.html").is_file()
    # The file name that is not UTF-8 is written back as its own bytes.
    assert b"caf\xe9.jpg" in (run / "predictions.csv").read_bytes()


def test_every_valid_image_is_used(trained):
    run, _ = trained
    summary = json.loads((run / "data_summary.json").read_text())["summary"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert sum(summary["images"].values()) == N_VALID
    assert metrics["train_images"] + metrics["valid_images"] == N_VALID
    assert summary["classes"] == ["green", "red"]  # the empty 'blue' folder is no class


def test_each_bad_file_is_named_with_its_reason(trained):
    run, r = trained
    checks = json.loads((run / "data_summary.json").read_text())["checks"]
    listed = {i["path"]: i["reason"] for i in checks["unusable"] + checks["source_skipped"]}
    out = flat(r.stderr)
    for name, words in BAD.items():
        assert words in listed.get(name, ""), (name, listed)
        assert f"skipped {name}: " in out and words in out, name
    assert len(listed) == len(BAD), "a valid file was reported as bad"
    assert not any(".ipynb_checkpoints" in p or "DS_Store" in p for p in listed)


def test_conversions_and_oddities_are_reported(trained):
    run, r = trained
    checks = json.loads((run / "data_summary.json").read_text())["checks"]
    assert checks["animated"] == 1 and checks["rotated"] == 1
    for kind in ("16-bit", "CMYK", "with transparency"):
        assert checks["conversions"].get(kind) == 1, (kind, checks["conversions"])
    dups = checks["duplicates"] + checks["leakage"]
    assert any(sorted(d["files"]) == ["train/red/dup_a.jpg", "train/red/dup_b.jpg"]
               for d in dups)
    out = flat(r.stderr)
    assert "class folder 'train/blue' has no images: ignored" in out
    assert "animated" in out and "EXIF" in out


@pytest.mark.slow
def test_train_with_a_messy_labels_csv(corpus, tmp_path, capsys):
    """BOM, Windows line ends, extra columns, a missing file and a blank label."""
    rows = ["file,label,photographer,notes"]
    for i in range(TRAIN_PER_CLASS):
        rows += [f"train/red/red_{i:03d}.jpg,red,ann,",
                 f"train/green/green_{i:03d}.jpg,green,bob,\"x, y\""]
    rows += ["train/red/not_there.jpg,red,ann,", "train/red/dup_a.jpg,,bob,",
             "train/red/empty.jpg,red,,"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    code, _, err = run_cli(["train", corpus, "--csv", csv_path, *TINY, "--out", tmp_path,
                            "--name", "csv"], capsys)
    assert code == 0, err
    out = flat(err)
    assert "Traceback" not in err
    checks = json.loads((tmp_path / "csv" / "data_summary.json").read_text())
    assert sum(checks["summary"]["images"].values()) == 2 * TRAIN_PER_CLASS
    for name, words in [("train/red/not_there.jpg", "not found"),
                        ("train/red/dup_a.jpg", "blank label"),
                        ("train/red/empty.jpg", "file is empty")]:
        assert f"skipped {name}: " in out and words in out, (name, out[-2000:])


# --- evaluate and predict ------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_on_the_corpus_skips_bad_files_by_name(trained, corpus, tmp_path, capsys):
    run, _ = trained
    code, _, err = run_cli(["evaluate", run, corpus, "--out", tmp_path / "eval"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["n_samples"] == N_VALID
    out = flat(err)
    for name, words in BAD.items():
        if "symbolic link" not in words and "not an image file" not in words:
            assert Path(name).name in out and words in out, name


@pytest.mark.slow
def test_evaluate_with_unknown_labels_uses_the_known_ones(trained, corpus, tmp_path, capsys):
    csv_path = tmp_path / "labels.csv"
    rows = ["image,label"] + [f"train/red/red_{i:03d}.jpg,red" for i in range(4)] + \
        [f"train/green/green_{i:03d}.jpg,horse" for i in range(3)]
    csv_path.write_text("\n".join(rows) + "\n")
    run, _ = trained
    code, _, err = run_cli(["evaluate", run, corpus, "--csv", csv_path, "--out",
                            tmp_path / "eval"], capsys)
    assert code == 0, err
    assert "labels the model does not know: horse" in flat(err)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_samples"] == 4


def test_evaluate_with_only_unknown_labels_fails_clearly(trained, corpus, tmp_path, capsys):
    csv_path = tmp_path / "labels.csv"
    rows = ["image,label"] + [f"train/red/red_{i:03d}.jpg,horse" for i in range(3)] + \
        [f"train/green/green_{i:03d}.jpg,zebra" for i in range(3)]
    csv_path.write_text("\n".join(rows) + "\n")
    run, _ = trained
    code, _, err = run_cli(["evaluate", run, corpus, "--csv", csv_path], capsys)
    assert code == 2 and "no images with known labels" in err and "Traceback" not in err


@pytest.mark.slow
def test_predict_on_the_corpus(trained, corpus, tmp_path, capsys):
    run, _ = trained
    code, out, err = run_cli(["predict", run, corpus, "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    lines = [ln for ln in out.splitlines() if "\t" in ln]
    assert len(lines) == N_VALID
    assert any("caf\\xe9.jpg" in ln or "caf\ufffd.jpg" in ln for ln in lines)
    err = flat(err)
    for name, words in BAD.items():
        if "not an image file" not in words:  # a folder's non-image files are not asked for
            assert f"skipped {name}" in err.replace(os.fsdecode(corpus) + "/", ""), name


def test_predict_only_bad_files_is_an_error(trained, corpus, capsys):
    run, _ = trained
    code, _, err = run_cli(["predict", run, corpus / "train" / "red" / "empty.jpg",
                            corpus / "train" / "red" / "page.jpg"], capsys)
    assert code == 2 and "no image could be predicted" in err
    assert "empty.jpg" in err and "page.jpg" in err and "Traceback" not in err


# --- nothing useful can be done: exit 2, one line ------------------------------------------


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_single_class_data_set(tmp_path, capsys):
    data = make_color_dataset(tmp_path / "one", per_class=4, classes=("red",))
    code, _, err = run_cli(["train", data, *TINY, "--out", tmp_path], capsys)
    assert code == 2 and "only one class ('red')" in one_error_line(err)
    assert not any((tmp_path).glob("one-*")), "a refused run leaves no run folder"


def test_empty_data_set(tmp_path, capsys):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    code, _, err = run_cli(["train", tmp_path / "data", *TINY, "--out", tmp_path], capsys)
    assert code == 2 and "no usable images" in one_error_line(err)


def test_every_image_bad(tmp_path, capsys):
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / cls / f"{i}.jpg").write_bytes(b"")
    code, _, err = run_cli(["train", tmp_path / "data", *TINY, "--out", tmp_path], capsys)
    line = one_error_line(err)
    assert code == 2 and "can be used" in line and "file is empty" in line


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run_cli(["train", tmp_path / "nope", *TINY], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)


@pytest.fixture
def bundle_copy(trained, tmp_path) -> Path:
    run, _ = trained
    return Path(shutil.copytree(run / "model", tmp_path / "model"))


def test_corrupted_bundle(bundle_copy, corpus, capsys):
    weights = bundle_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(["predict", bundle_copy, corpus / "valid"], capsys)
    line = one_error_line(err)
    assert code == 2 and "weights.safetensors" in line and "corrupt" in line


def test_bundle_of_another_architecture(bundle_copy, corpus, capsys):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["arch"] = "resnet10t"
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["evaluate", bundle_copy, corpus], capsys)
    line = one_error_line(err)
    assert code == 2 and "does not fit architecture 'resnet10t'" in line


@pytest.mark.parametrize("field, value, says", [
    ("std", [0, 0.5, 0.5], "preprocess.std must be 3 positive numbers"),
    ("size", -5, "preprocess.size must be a whole number of pixels"),
    ("size", 100000, "preprocess.size must be a whole number of pixels"),
    ("interpolation", "smooth", "preprocess.interpolation must be one of bicubic"),
    ("mean", "grey", "preprocess.mean must be 3 numbers"),
])
def test_hand_edited_bundle_settings(bundle_copy, corpus, capsys, field, value, says):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["preprocess"][field] = value
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["predict", bundle_copy, corpus / "valid"], capsys)
    line = one_error_line(err)
    assert code == 2 and "model.json is damaged" in line and says in line


def test_damaged_bundle_metadata(bundle_copy, corpus, capsys):
    (bundle_copy / "model.json").write_text('{"arch": "test_efficientnet", "classes": [')
    code, _, err = run_cli(["predict", bundle_copy, corpus / "valid"], capsys)
    assert code == 2 and "model.json is damaged" in one_error_line(err)


def test_weights_of_the_wrong_shape(corpus, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    sd = timm.create_model("resnet10t", pretrained=False).state_dict()
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights))
    args = ["train", corpus, "--model", "test_efficientnet", "--weights", weights, "--out",
            tmp_path]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2 and "does not fit 'test_efficientnet'" in line and "--model" in line


def test_debug_shows_the_traceback(bundle_copy, corpus):
    from imgclf.errors import ImgclfError

    (bundle_copy / "weights.safetensors").write_bytes(b"junk")
    old = sys.argv
    sys.argv = ["imgclf", "--debug", "predict", str(bundle_copy), str(corpus / "valid")]
    try:
        with pytest.raises(ImgclfError):  # re-raised, so Python prints the traceback
            from imgclf import cli

            cli.main()
    finally:
        sys.argv = old
