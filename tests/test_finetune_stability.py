"""Fine-tuning must start from the model the frozen stage trained, and never fail silently."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from imgclf.training import fine_tune, models
from imgclf.data.cache import decode_all
from imgclf.data.datasets import ImageDataset
from imgclf.data.presize import presize_image
from imgclf.data.transforms import Preprocess, eval_transform, normalize
from imgclf.training.epochs import EpochRow, fine_tuning_check


def _shifted_images(color_data, pre):
    """Images whose statistics are far from ImageNet's, so BatchNorm modes really differ."""
    paths = sorted(color_data.rglob("*.jpg"))[:16]
    images, errors, _ = decode_all(paths, pre, None, progress=False)
    assert not errors
    return ImageDataset(images, range(len(paths)), torch.zeros(len(paths), dtype=torch.long),
                        eval_transform(pre.size))


def test_cached_features_equal_the_first_unfrozen_step(color_data):
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    ds = _shifted_images(color_data, pre)
    loader = DataLoader(ds, batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    used = fine_tune.adapt_batchnorm(model, loader, pre, torch.device("cpu"))
    assert used == len(ds)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # statistics re-estimated

    # What the frozen stage caches ...
    feats, _ = fine_tune.extract_features(model, loader, pre, "32-true", torch.device("cpu"))
    # ... and what the unfrozen stage computes at its first step (the module in train mode,
    # BatchNorm held on its statistics).
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model.train()
    models.freeze_batchnorm_statistics(model)
    with torch.no_grad():
        first_step = models.pre_logits(model, normalize(x, pre.mean, pre.std))
        assert torch.allclose(feats, first_step, rtol=1e-4, atol=1e-4)
        # Batch statistics (BatchNorm training) would move them: the jump the fix removes.
        model.train()
        batch_mode = models.pre_logits(model, normalize(x[:8], pre.mean, pre.std))
    assert not torch.allclose(feats[:8], batch_mode, atol=1e-3)


def test_adapt_batchnorm_stops_at_its_image_budget(color_data):
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, size=32)
    ds = _shifted_images(color_data, pre)
    momenta = [m.momentum for m in models.batchnorm_layers(model)]
    used = fine_tune.adapt_batchnorm(model.eval(), DataLoader(ds, batch_size=8), pre,
                                    torch.device("cpu"), max_images=5)
    assert used == 5
    assert [m.momentum for m in models.batchnorm_layers(model)] == momenta
    assert not model.training  # the caller's mode is restored


def _row(epoch, stage, acc):
    return EpochRow(epoch=epoch, stage=stage, lr=1e-3, train_loss=1.0, valid_loss=1.0,
                    metrics={"valid_accuracy": acc}, seconds=1.0)


def test_fine_tuning_check_names_a_collapse():
    rows = [_row(0, "frozen", 0.69), _row(1, "unfrozen", 0.41), _row(2, "unfrozen", 0.35),
            _row(3, "unfrozen", 0.40)]
    check = fine_tuning_check(rows, "valid_accuracy", best_stage="frozen")
    assert check["frozen"] == pytest.approx(0.69)
    assert check["largest_drop"] == pytest.approx(0.34)
    assert check["largest_drop_epoch"] == 2
    assert check["helped"] is False
    assert len(check["warnings"]) == 2
    assert "34.0 points below" in check["warnings"][0]
    assert "did not help" in check["warnings"][1]


def test_fine_tuning_check_is_quiet_when_fine_tuning_helps():
    rows = [_row(0, "frozen", 0.80), _row(1, "unfrozen", 0.79), _row(2, "unfrozen", 0.90)]
    check = fine_tuning_check(rows, "valid_accuracy", best_stage="unfrozen")
    assert check["helped"] and check["warnings"] == [] and check["best_unfrozen"] == 0.90
    # Without a frozen stage there is nothing to compare with.
    assert fine_tuning_check(rows[1:], "valid_accuracy", "unfrozen") is None


def test_fine_tuning_check_ignores_smaller_progressive_sizes():
    rows = [_row(0, "frozen", 0.80), _row(1, "unfrozen-128px", 0.60),
            _row(2, "unfrozen-224px", 0.85)]
    check = fine_tuning_check(rows, "valid_accuracy", best_stage="unfrozen-224px")
    assert check["warnings"] == [] and check["largest_drop"] < 0


def _strip(width, height):
    """A grey image with a red band at its left end: a centre crop cuts the band away."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:, : width // 8] = (255, 0, 0)
    return Image.fromarray(pixels)


def test_auto_resize_keeps_a_long_image_whole_and_crops_photos_as_before():
    strip = _strip(285, 105)
    cropped = presize_image(strip, 64, resize="crop")
    whole = presize_image(strip, 64, resize="auto")
    assert cropped[0, :, 0].mean() < 200  # the band is gone
    assert whole[0, :, 0].mean() > 200 and whole[1, :, 0].mean() < 60  # still there
    assert np.array_equal(presize_image(strip, 64, resize="squish"), whole)
    photo = _strip(120, 90)  # 4:3, within the crop limit: exactly today's centre crop
    assert np.array_equal(presize_image(photo, 64, resize="auto"),
                          presize_image(photo, 64, resize="crop"))


def test_bundles_without_a_resize_field_crop():
    d = Preprocess(size=32, presize=36, resize="auto").to_dict()
    assert Preprocess.from_dict(d).resize == "auto"
    del d["resize"]
    assert Preprocess.from_dict(d).resize == "crop"


@pytest.fixture
def tiny_weights(tmp_path):
    """A local 'pretrained' file for test_efficientnet (random weights stand in for ImageNet)."""
    path = tmp_path / "weights.safetensors"
    torch.manual_seed(0)
    model = models.create_model("test_efficientnet", 1000, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_unfrozen_stage_holds_batchnorm_statistics(color_data, tmp_path, tiny_weights, mode):
    from imgclf import api

    run = api.train(color_data, model="test_efficientnet", weights=str(tiny_weights), size=32,
                    epochs=2, freeze_epochs=1, batch_size=8, workers=0, batchnorm=mode,
                    out=str(tmp_path / "runs"), name=mode)
    start = load_file(str(tiny_weights))
    kept = load_file(str(run.path / "model" / "weights.safetensors"))
    means = [k for k in start if k.endswith("running_mean")]
    scales = [k.replace("running_mean", "weight") for k in means]
    assert means
    same = all(torch.equal(start[k], kept[k]) for k in means)
    assert same == (mode == "frozen")
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["best_stage"] != "frozen" or metrics["fine_tuning"]["helped"] is False
    if metrics["best_stage"] != "frozen":
        # The body trained (BatchNorm's scale and shift included) while the statistics held.
        assert any(not torch.equal(start[k], kept[k]) for k in scales)
    assert set(metrics["fine_tuning"]) >= {"frozen", "best_unfrozen", "largest_drop", "helped"}


@pytest.mark.slow
def test_report_states_a_fine_tuning_warning(tiny_run, tmp_path):
    import shutil

    from imgclf.report.html import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    warning = "fine-tuning did not help: the kept model is the frozen stage's"
    m["fine_tuning"] = {"warnings": [warning], "helped": False}
    (run_dir / "metrics.json").write_text(json.dumps(m))
    import html

    page = html.unescape(write_report(run_dir).read_text())
    assert f"Warning: {warning}" in page.replace("<b>", "").replace("</b>", "")


def test_weight_average_half_life_is_counted_in_epochs():
    from imgclf.training.ema import ema_decay

    assert ema_decay(0.5, 20) ** 10 == pytest.approx(0.5)
    assert ema_decay(2.0, 100) ** 200 == pytest.approx(0.5)
    assert ema_decay(0.5, 1) == 0.5  # never shorter than one step


def test_weight_average_starts_from_the_fits_weights_and_moves_by_its_half_life():
    from imgclf.training.engine import ClassifierModule
    from imgclf.training.task import Task

    net = torch.nn.Linear(4, 3)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    module = ClassifierModule(net, Task(classes=["a", "b", "c"], multi_label=False),
                              [list(net.parameters())], [1e-3], ema_halflife=1.0)
    assert module.validated_net is module.ema
    assert not any(p.requires_grad for p in module.ema.parameters())
    module._ema_decay = 0.5 ** (1 / 4)  # half-life: 4 steps
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the trained weights jump by 1 and stay there
    for _ in range(4):
        module.update_ema()
    for k, v in module.ema.state_dict().items():
        assert torch.allclose(v, start[k] + 0.5, atol=1e-6)  # half way after one half-life
    assert ClassifierModule(net, Task(classes=["a", "b", "c"], multi_label=False),
                            [list(net.parameters())], [1e-3]).validated_net is net


def test_early_layers_are_the_stem_and_the_stages_at_a_quarter_resolution_or_more():
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    names = {n for n, p in model.named_parameters()
             if any(p is q for q in models.early_layer_params(model))}
    assert {"conv_stem.weight", "bn1.weight"} <= names
    assert any(n.startswith("blocks.1.") for n in names)
    assert not any(n.startswith(("blocks.2.", "conv_head", "classifier")) for n in names)
    # Models without stages at those resolutions (a ViT's patches start at 1/16) keep none.
    import timm

    assert models.early_layer_params(timm.create_model("vit_tiny_patch16_224")) == []


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [True, False])
def test_the_unfrozen_stage_keeps_the_early_layers_as_pretrained(color_data, tmp_path,
                                                                 tiny_weights, freeze):
    from imgclf import api
    from imgclf.training.engine import AtomicCheckpointIO

    run = api.train(color_data, model="test_efficientnet", weights=str(tiny_weights), size=32,
                    epochs=2, freeze_epochs=1, batch_size=8, workers=0, freeze_early=freeze,
                    out=str(tmp_path / "runs"), name=str(freeze))
    start = load_file(str(tiny_weights))
    state = AtomicCheckpointIO().load_checkpoint(run.path / "checkpoints" / "last.ckpt")
    trained = {k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    model = models.create_model("test_efficientnet", 3, pretrained=False)
    early = {n for n, p in model.named_parameters()
             if any(p is q for q in models.early_layer_params(model))}
    assert all(torch.equal(start[n], trained[n]) for n in early) == freeze
    later = [n for n, _ in model.named_parameters() if n.startswith("blocks.2.")]
    assert any(not torch.equal(start[n], trained[n]) for n in later)  # the rest fine-tuned
