"""What the recipe computes outside the Trainer: cached body features, BatchNorm statistics
re-estimated on training images, and the state the unfrozen stage starts from (head weights and
BatchNorm buffers), kept as safetensors.

Cached features and the memory budget: the frozen stage holds V augmented views of N training
features of F floats (V * N * F * 4 bytes: 100k images, one view, 1280 features is 512 MB; three
views 1.5 GB). They are written into one preallocated [V * N, F] float32 block, never
concatenated from per-batch copies (which peaks at twice the bytes). When the block would
exceed the memory budget (`imgclf.data.cache.default_memory_budget`: min(4 GiB, 25% of the
memory available), `$IMGCLF_MEMORY_BUDGET_GB` overrides it) it is a memory-mapped temporary
file instead, deleted as soon as it is mapped: the head's loader reads the rows it samples, and
the kernel keeps in memory what it can and drops what it must, so the process's own memory does
not grow with N.

Split from `imgclf.training.fine_tune`, whose stages use these.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf import progress
from imgclf.data.cache import default_memory_budget
from imgclf.data.transforms import Preprocess, normalize
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_bytes
from imgclf.training import models

log = logging.getLogger(__name__)


def autocast_context(precision: str, device: torch.device):
    """The autocast matching a Lightning precision string, for passes outside the Trainer."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def feature_block(rows: int, width: int, budget: int | None = None,
                  folder: str | Path | None = None) -> torch.Tensor:
    """An uninitialised [rows, width] float32 tensor: in memory within the budget, else backed
    by a memory-mapped temporary file.

    Args:
        rows: Feature rows (views times images).
        width: Features per row.
        budget: Bytes allowed in memory (None: `default_memory_budget()`).
        folder: Where the temporary file goes (None: the system's temporary folder).
    """
    budget = default_memory_budget() if budget is None else budget
    nbytes = rows * width * 4
    if nbytes <= budget or rows == 0:
        return torch.empty(rows, width, dtype=torch.float32)
    log.info("Cached features take %.2f GB, over the memory budget of %.2f GB: memory-mapped "
             "from a temporary file", nbytes / 1e9, budget / 1e9)
    # TemporaryFile has no name on POSIX: the mapping keeps the bytes alive and the file
    # vanishes with the last reference, even after a crash.
    with tempfile.TemporaryFile(prefix="imgclf-features-", dir=folder) as f:
        mapped = np.memmap(f, dtype=np.float32, mode="w+", shape=(rows, width))
    return torch.from_numpy(mapped)


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, pre: Preprocess, precision: str,
                     device: torch.device, desc: str = "Caching features",
                     views: int = 1, budget: int | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features of every batch (model in eval mode): ([V * N, F] float32, targets).

    Args:
        model: The network; `models.pre_logits` gives its pooled features.
        loader: The images, in a fixed order (its transform may be random: each view differs).
        pre: Normalisation statistics.
        precision: Lightning precision string for the autocast.
        device: Where the body runs.
        desc: What the progress report calls the pass.
        views: Passes over the loader, stored view after view (row v * N + i is image i of
            view v, as `frozen_head.ViewSampler` reads them).
        budget: Bytes the block may take in memory before it is memory-mapped
            (None: `default_memory_budget()`); see the module docstring.
    """
    model.eval()
    n = len(loader.dataset)
    block: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    for v in range(views):
        at = v * n
        label = desc if views == 1 else f"{desc} (view {v + 1}/{views})"
        with progress.task(label, total=n) as advance:
            for x, y in loader:
                x = normalize(x.to(device), pre.mean, pre.std).contiguous(
                    memory_format=torch.channels_last)
                with autocast_context(precision, device):
                    f = models.pre_logits(model, x).float().cpu()
                if block is None:  # the width is known from the first batch
                    block = feature_block(views * n, f.shape[1], budget)
                    targets = torch.empty((views * n, *y.shape[1:]), dtype=y.dtype)
                block[at:at + len(f)] = f
                targets[at:at + len(f)] = y
                at += len(f)
                advance(len(x))
    if block is None:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return block, targets


def time_training_steps(model: nn.Module, loader: DataLoader, pre: Preprocess, precision: str,
                        device: torch.device, steps: int = 4, warm_up: int = 2,
                        freeze_bn: bool = True) -> float:
    """Seconds per training step of the whole network, batches loaded from `loader` included:
    the median of `steps` steps timed after `warm_up` untimed ones.

    Timed on a copy, under a forked random state, so the run itself is unchanged; the time
    budget's planner extrapolates from it. The copy trains what `model` has trainable (frozen
    early layers cost no backward pass). The first steps of a process are slow while its heap
    grows to a step's peak (tf_efficientnet_lite0, batch 32, 2 cores: 2.01, 0.97, 1.27, 0.86,
    then 0.75-0.78 s); the run's own steps reuse that memory and start at the steady pace.
    Timed from the second step, the estimate was a third too high, and a 2-minute budget on
    caltech101 planned one short epoch and ended 17% early.
    """
    net = copy.deepcopy(model).to(device)
    net.train()
    if freeze_bn:
        models.freeze_batchnorm_statistics(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    times: list[float] = []
    with torch.random.fork_rng(devices=[]):
        t = time.perf_counter()
        for x, y in loader:
            x = normalize(x.to(device), pre.mean, pre.std).contiguous(
                memory_format=torch.channels_last)
            with autocast_context(precision, device):
                out = net(x).float()
            loss = (nn.functional.cross_entropy(out, y.to(device).long()) if y.dim() == 1 else
                    nn.functional.binary_cross_entropy_with_logits(out, y.to(device).float()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if len(times) >= warm_up + steps:
                break
    del net, opt
    # A loader of few batches leaves fewer steps; at least one is always timed.
    timed = times[min(warm_up, len(times) - 1):]
    return float(statistics.median(timed))


ADAPT_IMAGES = 1024


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader: DataLoader, pre: Preprocess, device: torch.device,
                    max_images: int = ADAPT_IMAGES) -> int:
    """Re-estimate every BatchNorm layer's running statistics on (augmented) training images.

    A cumulative average over up to `max_images` images (momentum None), as
    `torch.optim.swa_utils.update_bn` computes it; written here because that helper runs the
    whole loader and cannot normalise uint8 batches. Returns the number of images used.
    """
    layers = models.batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in layers:
        m.train()
    seen = 0
    try:
        with progress.task("Adapting BatchNorm statistics",
                           total=min(max_images, len(loader.dataset))) as advance:
            for x, _ in loader:
                x = x[: max_images - seen]
                x = normalize(x.to(device), pre.mean, pre.std).contiguous(
                    memory_format=torch.channels_last)
                models.pre_logits(model, x)
                seen += len(x)
                advance(len(x))
                if seen >= max_images:
                    break
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def start_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the unfrozen stage starts from besides the pretrained body: the trained head and
    the BatchNorm statistics (re-estimated on the training data with --batchnorm adapt)."""
    head = {f"head.{k}": v for k, v in models.classifier(model).state_dict().items()}
    bn_ids = {id(m) for m in models.batchnorm_layers(model)}
    stats = {f"body.{name}.{b}": buf for name, m in model.named_modules() if id(m) in bn_ids
             for b, buf in m.named_buffers(recurse=False)}
    return {**head, **stats}


def load_start_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `start_state` (a file of head weights alone, as older runs wrote, works too)."""
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    models.classifier(model).load_state_dict(head or state)
    body = {k[5:]: v for k, v in state.items() if k.startswith("body.")}
    if body:
        model.load_state_dict(body, strict=False)


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A state dict as safetensors, atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict, or an ImgclfError naming the damaged file and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ImgclfError(f"{path}: damaged or not a safetensors file ({e}): delete the run's "
                          "checkpoints/ folder and train again") from None
