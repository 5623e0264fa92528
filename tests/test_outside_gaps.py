"""Gaps an outside test found (issue 16): evaluate scoring what the run scored, evaluate's CSV
columns, multi-page TIFFs, the server's decode budget, an unreachable hub, epoch numbering."""

from __future__ import annotations

import asyncio
import csv
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from imgclf.errors import ImgclfError


def _copy_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.path, run)
    return run


def test_evaluate_scores_the_images_the_run_scored(tiny_run, tmp_path, color_data):
    """After `imgclf mine` predictions.csv holds held-out negatives the data folder lacks;
    evaluate must score exactly the file's images, not re-derive the split."""
    from imgclf import api

    run = _copy_run(tiny_run, tmp_path)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    extra = tmp_path / "outside" / "red_extra.jpg"
    extra.parent.mkdir()
    shutil.copy(next((color_data / "red").iterdir()), extra)
    like = next(r for r in rows if r["target"] == "red")
    with open(run / "predictions.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**like, "path": str(extra)})
    result = api.evaluate(run)
    assert result["n_samples"] == len(rows) + 1


def test_evaluate_takes_csv_columns_by_any_header(tiny_run, tmp_path, color_data):
    from imgclf import api

    labels = tmp_path / "labels.csv"
    files = [p for c in sorted(color_data.iterdir()) for p in sorted(c.glob("*.jpg"))[:3]]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["picture", "what"])
        for p in files:
            w.writerow([p.relative_to(color_data).as_posix(), p.parent.name])
    result = api.evaluate(tiny_run.path, color_data, csv=str(labels), image_col="picture",
                          label_col="what", out=tmp_path / "eval")
    assert result["n_samples"] == len(files)


def test_evaluate_cli_has_the_column_flags():
    from typer.testing import CliRunner

    from imgclf.cli.app import app

    out = CliRunner().invoke(app, ["evaluate", "--help"], terminal_width=200).output
    for flag in ("--image-col", "--label-col", "--split-col", "--single-label"):
        assert flag in out


def test_a_single_label_model_on_multi_label_data_is_one_clear_error(tiny_run, tmp_path,
                                                                     color_data):
    from imgclf import api

    labels = tmp_path / "labels.csv"
    files = [p for c in sorted(color_data.iterdir()) for p in sorted(c.glob("*.jpg"))[:4]]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["picture", "what"])
        for i, p in enumerate(files):
            w.writerow([p.relative_to(color_data).as_posix(),
                         "red green" if i % 2 else p.parent.name])
    with pytest.raises(ImgclfError, match="multi-label"):
        api.evaluate(tiny_run.path, color_data, csv=str(labels), image_col="picture",
                     label_col="what", multi_label=True, out=tmp_path / "eval")


def test_a_multi_page_tiff_is_said_to_use_its_first_page(tmp_path):
    from imgclf.data.images import open_rgb_with_info
    from imgclf.data.validate import CheckReport

    pages = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "scan.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    img, info = open_rgb_with_info(path)
    assert info.animated and np.asarray(img)[0, 0, 0] == 10
    report = CheckReport()
    report.animated = 1
    assert any("multi-page" in line for line in report.lines())


def test_the_pixel_budget_bounds_concurrent_decodes_and_lets_a_huge_image_through():
    from imgclf.deploy.serve import PixelBudget

    budget = PixelBudget(100)
    running, most = [0], [0]

    async def decode(pixels):
        async with budget.hold(pixels, timeout=10):
            running[0] += 1
            most[0] = max(most[0], running[0])
            await asyncio.sleep(0.01)
            running[0] -= 1

    async def scenario():
        await asyncio.gather(*(decode(40) for _ in range(12)))
        await decode(1000)  # over the whole budget: runs alone
        with pytest.raises(asyncio.TimeoutError):
            async with budget.hold(60, timeout=5):
                async with budget.hold(60, timeout=0.05):
                    pass

    asyncio.run(scenario())
    assert budget.peak <= 100 and most[0] == 2
    assert budget.in_flight == 0


def test_declared_pixels_come_from_the_header(tmp_path):
    import io

    from imgclf.deploy.serve import declared_pixels

    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, format="PNG")
    assert declared_pixels(buf.getvalue()) == 6_000_000
    assert declared_pixels(b"not an image") == 0


def test_without_network_the_hub_is_asked_offline_at_once(monkeypatch):
    import timm
    from huggingface_hub import constants

    from imgclf.training import models

    seen = {}

    def fake_create(arch, pretrained=False, **kw):
        seen["offline"] = constants.HF_HUB_OFFLINE
        raise OSError("offline and not in the local cache")

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", fake_create)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(ImgclfError, match="--weights FILE"):
        models.create_model("resnet18", 3, pretrained=True)
    assert seen["offline"] is True and constants.HF_HUB_OFFLINE == before


def test_epochs_are_counted_from_one():
    from imgclf.training.engine import _EpochBar

    bar = _EpochBar()
    bar._trainer = types.SimpleNamespace(max_epochs=1)
    assert bar._get_train_description(0) == "Epoch 1/1"
