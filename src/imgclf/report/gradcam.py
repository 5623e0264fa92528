"""Grad-CAM: where in an image a classifier found the evidence for a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last feature map by the mean
gradient of the class score with respect to it, sums the channels and keeps the positive part.
For timm models the last feature map is `model.forward_features(x)` and the class score is
`model.forward_head(features)`, so the gradient only has to flow through the head: the body runs
once without autograd, which keeps one heatmap to a single forward pass even on a CPU.

Heatmaps are drawn over the *evaluation view*: the presized, center-cropped picture that
validation and `predict` feed the model, so the overlay shows exactly the pixels it saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.data.images import open_rgb
from imgclf.data.transforms import Preprocess, center_crop, normalize


@dataclass
class Heatmap:
    """A class-activation map over one image's evaluation view.

    Attributes:
        view: The evaluation view the model saw, uint8 [S, S, 3].
        cam: Activation in [0, 1] per pixel [S, S] (0 everywhere when nothing supports the class).
        class_index: The class the map explains.
        class_name: Its name.
        probability: The model's probability for that class on this view.
    """

    view: np.ndarray
    cam: np.ndarray
    class_index: int
    class_name: str
    probability: float

    def overlay(self, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
        """The view with the map blended over it, uint8 [S, S, 3]."""
        return overlay(self.view, self.cam, alpha=alpha, cmap=cmap)


def eval_view(image: str | Path | np.ndarray, pre: Preprocess) -> np.ndarray:
    """The center crop the model sees at evaluation, uint8 [3, S, S].

    Args:
        image: An image file, or an already presized uint8 array [3, P, P].
        pre: The bundle's preprocessing.
    """
    if isinstance(image, np.ndarray):
        arr = image
    else:
        arr = pre.presize_image(open_rgb(image))
    return center_crop(torch.from_numpy(np.ascontiguousarray(arr)), pre.size).numpy()


def grad_cam(
    model: nn.Module,
    view: np.ndarray,
    pre: Preprocess,
    classes: list[int] | None = None,
    multi_label: bool = False,
    layer: nn.Module | None = None,
) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """Grad-CAM maps of several classes for one image, from a single forward pass.

    Args:
        model: A timm classifier (anything with `forward_features` and `forward_head`), or any
            classifier when `layer` is given.
        view: The evaluation view, uint8 [3, S, S] (see `eval_view`).
        pre: Preprocessing, for the normalisation statistics.
        classes: Class indices to explain; None explains the most probable class.
        multi_label: Probabilities by sigmoid instead of softmax.
        layer: Module whose output is the feature map. Default: the output of
            `forward_features`; for transformers that classify from a class token, the input of
            the last block (the final tokens carry no gradient there); for models without
            `forward_features`, the last convolution.

    Returns:
        The classes explained; one map per class in [0, 1], float32 [S, S], upsampled from the
        feature map; and the class probabilities [C] of this view.
    """
    layer = layer if layer is not None else default_layer(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = normalize(torch.from_numpy(np.ascontiguousarray(view))[None].to(device), pre.mean, pre.std)
    try:
        with torch.enable_grad():
            if layer is None:
                # Only the head needs autograd: the body runs once without building a graph.
                with torch.no_grad():
                    feats = model.forward_features(x)
                feats = feats.detach().float().requires_grad_(True)
                logits = model.forward_head(feats).float()
            else:
                captured: list[torch.Tensor] = []
                handle = layer.register_forward_hook(lambda m, i, o: captured.append(o))
                try:
                    # The input requires grad so that a graph is built even for frozen weights.
                    logits = model(x.requires_grad_(True)).float()
                finally:
                    handle.remove()
                feats = captured[-1]
            if classes is None:
                classes = [int(logits[0].argmax())]
            maps = []
            for i, c in enumerate(classes):
                (grad,) = torch.autograd.grad(logits[0, c], feats, retain_graph=i < len(classes) - 1)
                maps.append(_cam(feats.detach().float(), grad.float(), model, view.shape[-2:]))
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    finally:
        model.train(was_training)
    return list(classes), maps, probs[0].detach().cpu().numpy()


def default_layer(model: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM reads when none is given (None: the output of `forward_features`)."""
    if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError("cannot find a feature map: pass the layer to explain")
        return convs[-1]
    blocks = getattr(model, "blocks", None)
    if getattr(model, "global_pool", None) in ("token", "map") and blocks is not None and len(blocks):
        last = blocks[-1]
        return getattr(last, "norm1", last)
    return None


def _cam(feats: torch.Tensor, grad: torch.Tensor, model: nn.Module, size) -> np.ndarray:
    fmap, gmap = _as_nchw(feats, model), _as_nchw(grad, model)
    weights = gmap.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    cam = cam[0, 0]
    top = cam.max()
    # A map with no positive evidence stays zero rather than amplifying numerical noise.
    cam = cam / top if top > 1e-8 else torch.zeros_like(cam)
    return cam.cpu().numpy().astype(np.float32)


def _as_nchw(t: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Feature maps as [1, C, H, W], whatever layout the architecture uses."""
    n_feat = getattr(model, "num_features", None)
    if t.ndim == 3:
        # Vision transformers: [1, prefix + H*W, C] tokens; drop class/register tokens.
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = t[:, prefix:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot lay {tokens.shape[1]} tokens out as a square feature map")
        return tokens.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
    if t.ndim != 4:
        raise ValueError(f"feature map of shape {tuple(t.shape)} has no spatial layout")
    if n_feat is not None and t.shape[1] != n_feat and t.shape[-1] == n_feat:
        return t.permute(0, 3, 1, 2)  # channels-last models (e.g. Swin, MambaOut)
    return t


def overlay(view: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map over an image as a colour heat map.

    The colour's opacity grows with the map, so regions without activation stay close to their
    original pixels (lightly tinted) and the hot regions stand out.

    Args:
        view: uint8 [S, S, 3] or [3, S, S].
        cam: float [S, S] in [0, 1].
        alpha: Opacity of the hottest regions.
        cmap: A matplotlib colormap name.

    Returns:
        uint8 [S, S, 3].
    """
    import matplotlib

    img = view.transpose(1, 2, 0) if view.shape[0] == 3 and view.shape[-1] != 3 else view
    colours = matplotlib.colormaps[cmap](np.clip(cam, 0, 1))[..., :3] * 255.0
    weight = alpha * (0.25 + 0.75 * np.clip(cam, 0, 1))[..., None]
    out = img.astype(np.float32) * (1 - weight) + colours * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def heatmaps_for(
    model: nn.Module,
    image: str | Path | np.ndarray,
    pre: Preprocess,
    class_names: list[str],
    classes: list[int] | None = None,
    multi_label: bool = False,
) -> list[Heatmap]:
    """Heatmaps of one image for the given classes (default: the predicted class).

    Args:
        model: A timm classifier.
        image: An image file or a presized uint8 array [3, P, P].
        pre: The bundle's preprocessing.
        class_names: Names of the model's outputs.
        classes: Class indices to explain; None explains the most probable class.
        multi_label: Sigmoid outputs.
    """
    view = eval_view(image, pre)
    classes, maps, probs = grad_cam(model, view, pre, classes, multi_label)
    hwc = view.transpose(1, 2, 0)
    return [Heatmap(view=hwc, cam=m, class_index=c, class_name=class_names[c],
                    probability=float(probs[c])) for m, c in zip(maps, classes)]
