"""timm backbones with a new head: creation, local weights, freezing and layer groups."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

import timm
import torch
from torch import nn

from imgclf.errors import ImgclfError


def create_model(
    arch: str,
    num_classes: int,
    pretrained: bool = True,
    weights: str | Path | None = None,
    drop_rate: float | None = None,
) -> nn.Module:
    """A timm model with a fresh `num_classes` head.

    Args:
        arch: Any timm architecture name.
        num_classes: Outputs of the new head.
        pretrained: Load ImageNet weights from the hub (network needed) when `weights` is None.
        weights: A local safetensors/pth state dict for `arch` (keys as timm names them).
        drop_rate: Dropout before the classifier; timm's default when None.

    Raises:
        ImgclfError: Unknown architecture, unreachable hub, missing or mismatched weights file.
    """
    if arch not in timm.list_models() and not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:8]}*")[:5]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ImgclfError(f"unknown model '{arch}'.{hint} See `timm.list_models()` for all names.")
    kwargs: dict = {"num_classes": num_classes}
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if weights is not None or pretrained:
        model = _create_pretrained(arch, weights, kwargs)
        # A zero head starts at chance-level loss instead of large random logits on pretrained
        # features, which keeps the LR finder's curve and the first head steps well behaved.
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return model
    return timm.create_model(arch, pretrained=False, **kwargs)


def _create_pretrained(arch: str, weights: str | Path | None, kwargs: dict) -> nn.Module:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ImgclfError(f"weights file {path} does not exist: check the path given to --weights")
        try:
            model = timm.create_model(
                arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
            file_keys = set(timm.models.load_state_dict(str(path), weights_only=True))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise ImgclfError(
                f"weights file {path} does not fit model '{arch}' ({_short(e)}): "
                f"pass the weights of '{arch}' or the --model they belong to"
            ) from e
        check_weights_cover(model, file_keys, path)
        return model
    try:
        if hub_reachable():
            return timm.create_model(arch, pretrained=True, **kwargs)
        # No network: the weights may still be in the local hub cache; offline, the hub
        # client answers from it at once instead of retrying for about 50 s.
        with _hub_offline():
            return timm.create_model(arch, pretrained=True, **kwargs)
    except (OSError, ConnectionError, RuntimeError) as e:
        raise ImgclfError(
            f"could not fetch pretrained weights for '{arch}' ({_short(e)}): without network, "
            "pass a local file with --weights FILE, or --no-pretrained to start from random weights"
        ) from e


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub's host accepts a connection within `timeout` seconds."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for the duration (its module constant, read per call)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def check_weights_cover(model: nn.Module, file_keys: set[str], path: Path) -> None:
    """Refuse a weights file that leaves part of the body at its random initialisation.

    timm loads a file non-strictly whenever the head is replaced, so a file missing half the
    body's tensors would train from a half-random network without a word. Only the classifier
    may be absent. A file sharing no name with the model is left to timm, whose filters
    translate other checkpoint layouts for some architectures.
    """
    head = {f"{name}.{k}" for name, m in model.named_modules() if m is classifier(model)
            for k in m.state_dict()}
    wanted = {k for k in model.state_dict() if k not in head and not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - file_keys)
    if missing and wanted & file_keys:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ImgclfError(
            f"weights file {path} lacks {len(missing)} of the {len(wanted)} tensors of the "
            f"model's body ({shown}): the file is incomplete or belongs to another variant; "
            "pass the complete weights of this --model")


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) < 200 else text[:197] + "..."


def classifier(model: nn.Module) -> nn.Module:
    """The final linear layer (the part that is replaced for a new set of classes)."""
    return model.get_classifier()


def grow_classifier(model: nn.Module, extra: int = 1) -> nn.Module:
    """Add `extra` outputs to the classifier, keeping the trained rows (in place; returns model).

    The new rows start as the mean of the old ones, so a new class begins with an average logit:
    never the top prediction of a confident image, and no large random logits that would
    disturb the trained classes in the first steps.
    """
    old = classifier(model)
    if not isinstance(old, nn.Linear):
        raise ImgclfError(f"cannot add a class to a {type(old).__name__} classifier: only "
                          "models whose head is one linear layer can grow")
    weight, bias = old.weight.detach().clone(), None if old.bias is None else old.bias.detach().clone()
    n = weight.shape[0]
    model.reset_classifier(n + extra)
    new = classifier(model).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight[:n] = weight
        new.weight[n:] = weight.mean(0, keepdim=True)
        if bias is not None and new.bias is not None:
            new.bias[:n] = bias
            new.bias[n:] = bias.mean()
    return model


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Body output right before the classifier (pooled features)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (timm's BatchNormAct2d included: it subclasses BatchNorm2d)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put BatchNorm layers in eval mode: they normalise with their running statistics and no
    longer update them, while their scale and shift still train. Call after `model.train()`."""
    for m in batchnorm_layers(model):
        m.eval()


def set_body_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the classifier."""
    head_params = {id(p) for p in classifier(model).parameters()}
    for p in model.parameters():
        p.requires_grad = trainable or id(p) in head_params


def early_layer_params(model: nn.Module, max_reduction: int = 4) -> list[nn.Parameter]:
    """The parameters of the layers that run at 1/2 and 1/4 of the input's resolution: the
    stem and the stages timm's `feature_info` places at a reduction of at most `max_reduction`
    (and everything registered before them). Empty for models without `feature_info`."""
    info = getattr(model, "feature_info", None)
    try:
        modules = [f["module"] for f in info if int(f["reduction"]) <= max_reduction]
    except (TypeError, KeyError, ValueError):
        return []
    if not modules:
        return []
    named = list(model.named_parameters())
    last = max((i for i, (n, _) in enumerate(named) if n.startswith(modules[-1] + ".")),
               default=-1)
    head = {id(p) for p in classifier(model).parameters()}
    return [p for _, p in named[:last + 1] if id(p) not in head]


def layer_groups(model: nn.Module, n_groups: int = 3) -> list[list[nn.Parameter]]:
    """Parameters split from input to output into `n_groups` groups, the classifier last.

    The body's coarse groups (timm's `group_matcher`: stem, then stages) are merged into
    `n_groups - 1` contiguous chunks of similar parameter count so that earlier layers can get
    smaller learning rates.
    """
    head = list(classifier(model).parameters())
    head_ids = {id(p) for p in head}
    body_named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    try:
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        name_to_p = dict(body_named)
        ordered = [[name_to_p[n] for n in names if n in name_to_p] for _, names in sorted(groups.items())]
        ordered = [g for g in ordered if g]
    except (AttributeError, NotImplementedError, TypeError):
        ordered = [[p] for _, p in body_named]
    chunks = _split_even(ordered, max(1, n_groups - 1))
    return [c for c in chunks if c] + [head]


def _split_even(groups: list[list[nn.Parameter]], n: int) -> list[list[nn.Parameter]]:
    total = sum(p.numel() for g in groups for p in g)
    out: list[list[nn.Parameter]] = [[] for _ in range(n)]
    seen = 0
    for g in groups:
        size = sum(p.numel() for p in g)
        # Assign each coarse group to the chunk containing its midpoint in parameter count.
        idx = min(n - 1, int((seen + size / 2) / max(total, 1) * n))
        out[idx].extend(g)
        seen += size
    return out


def has_depthwise_convs(model: nn.Module) -> bool:
    """True when most convolutions are depthwise (EfficientNet/MobileNet style)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1 and m.groups == m.in_channels]
    return bool(convs) and len(depthwise) / len(convs) > 0.2


def cpu_supports_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU, where bf16 autocast speeds up matrix math."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))
