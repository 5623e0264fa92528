"""Model creation, local weights, freezing and the discriminative layer groups."""

import pytest
import torch
from safetensors.torch import save_file

from imgclf.training import models
from imgclf.errors import ImgclfError
from imgclf.training.fine_tune import discriminative_lrs


def test_freeze_body_leaves_only_head_trainable():
    m = models.create_model("test_efficientnet", 3, pretrained=False)
    models.set_body_trainable(m, False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    models.set_body_trainable(m, True)
    assert all(p.requires_grad for p in m.parameters())


def test_layer_groups_cover_every_parameter_once_in_order():
    m = models.create_model("test_resnet", 4, pretrained=False)
    groups = models.layer_groups(m, 3)
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {id(p) for p in groups[-1]} == {id(p) for p in m.get_classifier().parameters()}
    names = {id(p): n for n, p in m.named_parameters()}
    assert any(names[id(p)].startswith("stem") or names[id(p)].startswith("conv1")
               for p in groups[0])


def test_discriminative_lrs_are_geometric():
    lrs = discriminative_lrs(1e-3, 3)
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(1e-4)


def test_local_weights_load_and_head_is_fresh(tmp_path):
    src = models.create_model("test_efficientnet", 1000, pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = models.create_model("test_efficientnet", 5, weights=path)
    assert torch.equal(m.conv_stem.weight, src.conv_stem.weight)
    assert m.get_classifier().out_features == 5
    assert torch.count_nonzero(m.get_classifier().weight) == 0


def test_wrong_weights_give_clear_error(tmp_path):
    src = models.create_model("test_resnet", 1000, pretrained=False)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ImgclfError, match="does not fit model 'test_efficientnet'"):
        models.create_model("test_efficientnet", 3, weights=path)
    with pytest.raises(ImgclfError, match="does not exist"):
        models.create_model("test_efficientnet", 3, weights=tmp_path / "missing.safetensors")


def test_unknown_architecture():
    with pytest.raises(ImgclfError, match="unknown model"):
        models.create_model("no_such_net_xyz", 3, pretrained=False)


def test_pre_logits_then_classifier_equals_forward():
    m = models.create_model("test_efficientnet", 3, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(models.classifier(m)(models.pre_logits(m, x)), m(x), atol=1e-5)


def test_weights_missing_part_of_the_body_are_refused_with_what_is_missing(tmp_path):
    state = {k: v.contiguous() for k, v in
             models.create_model("test_efficientnet", 1000, pretrained=False).state_dict().items()}
    body = [k for k in state if not k.startswith("classifier.")]
    half = {k: v for i, (k, v) in enumerate(state.items()) if k not in body[::2]}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ImgclfError, match=r"lacks \d+ of the \d+ tensors.*complete weights"):
        models.create_model("test_efficientnet", 3, weights=tmp_path / "half.safetensors")
    # Without the classifier the file is complete: the head is new anyway.
    save_file({k: state[k] for k in body}, str(tmp_path / "body.safetensors"))
    m = models.create_model("test_efficientnet", 3, weights=tmp_path / "body.safetensors")
    assert torch.equal(m.state_dict()[body[0]], state[body[0]])
