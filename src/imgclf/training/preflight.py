"""Checks before any training: everything that would otherwise fail minutes or hours in.

Each check returns a list of problems, one line each, naming what is wrong and the fix; `require`
raises them together, so a user fixes everything in one go rather than one failure per attempt.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from imgclf.data.samples import TRAIN, VALID, SampleTable
from imgclf.errors import ImgclfError, display_path

# Bytes per parameter a run keeps on disk at its peak: last.ckpt holds the weights and AdamW's two
# moments (3 x 4 bytes) and is written next to the previous one before the rename (x 2), plus the
# best epoch's weights and the bundle (4 bytes each), all float32.
BYTES_PER_PARAMETER = 4 * (3 * 2 + 1 + 1)
# Reports, plots, predictions, metrics and the head checkpoint.
FIXED_BYTES = 50 * 1024**2
# Tensors whose shape timm adapts when loading (to the input size), so a mismatch is no error.
_ADAPTED = ("pos_embed", "relative_position", "rel_pos")


def require(problems: list[str]) -> None:
    """Raise all problems as one ImgclfError (one line each); do nothing when there are none."""
    if problems:
        head = "" if len(problems) == 1 else f"{len(problems)} problems before training:\n"
        raise ImgclfError(head + "\n".join(problems))


def check(cfg, table: SampleTable, folder: str | Path) -> list[str]:
    """Every check that applies to a run with settings `cfg` on `table`, writing to `folder`.

    Args:
        cfg: The run's TrainConfig.
        table: The loaded data.
        folder: The run directory, or the folder that will hold it.
    """
    problems = data_problems(table)
    problems += output_problems(folder)
    problems += weights_problems(cfg.weights, cfg.model, max(1, len(table.classes)))
    if not problems:
        params = count_parameters(cfg.model, max(1, len(table.classes)))
        problems += disk_problems(folder, params)
    return problems


def data_problems(table: SampleTable) -> list[str]:
    """At least two classes (or a multi-label set), training images in every class, and a
    validation split."""
    where = display_path(table.root) if table.root else "the data"
    if not table.samples:
        return [f"{where}: no usable images: put each class's images in its own folder"]
    if not table.multi_label and len(table.classes) < 2:
        only = f"only one class ('{table.classes[0]}')" if table.classes else "no classes"
        return [f"{where}: found {only}; a classifier needs at least two: add images of another "
                "class, or pass a multi-label CSV"]
    if table.multi_label and not table.classes:
        return [f"{where}: no image carries a label: fill in the label column"]
    counts = table.counts()
    train, valid = counts.get(TRAIN, {}), counts.get(VALID, {})
    problems = []
    if not table.split(TRAIN):
        problems.append(f"{where}: no training images: check the split column or the train/ "
                        "folder")
    if not table.split(VALID):
        problems.append(f"{where}: no validation images: add a valid/ folder or split column, "
                        "or let imgclf hold out --valid-pct at random")
    if table.split(TRAIN):
        empty = [c for c in table.classes if not train.get(c)]
        if empty:
            shown = ", ".join(f"'{display_path(c)}'" for c in empty[:5])
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            problems.append(f"{where}: class(es) {shown}{more} have no training images "
                            f"({sum(valid.get(c, 0) for c in empty)} in validation): add "
                            "training images of them, or remove the class")
    return problems


def output_problems(folder: str | Path) -> list[str]:
    """The run folder (or the nearest folder above it that exists) can be written to."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return [f"{display_path(existing)} is a file, not a folder: pass a folder with --out"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"cannot write to {display_path(existing)} (permission denied or read-only): "
                "pass a writable folder with --out"]
    return []


def checkpoint_bytes(n_params: int) -> int:
    """Disk a run needs for checkpoints, best weights, bundle and reports (see the constants)."""
    return n_params * BYTES_PER_PARAMETER + FIXED_BYTES


def disk_problems(folder: str | Path, n_params: int) -> list[str]:
    """Enough free disk under `folder` for a model of `n_params` parameters."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    need = checkpoint_bytes(n_params)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return []  # unknown free space is not a reason to refuse
    if free < need:
        return [f"not enough disk space in {display_path(existing)}: a model of "
                f"{n_params / 1e6:.1f}M parameters needs about {_size(need)} for checkpoints "
                f"and the bundle, {_size(free)} is free: free some space or pass another --out"]
    return []


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@functools.lru_cache(maxsize=4)
def _meta_model(arch: str, num_classes: int):
    """The architecture on the meta device: shapes and names without allocating any memory.

    Cached because the weights check and the disk check both need it, and building lite0's
    modules costs about 0.3 s of a run's fixed start-up; callers only read it."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def count_parameters(arch: str, num_classes: int) -> int:
    """Parameters of `arch` with a `num_classes` head (0 when timm does not know the name; the
    model factory says so with suggestions)."""
    try:
        model = _meta_model(arch, num_classes)
    except Exception:  # noqa: BLE001 - an unknown name is reported by models.create_model
        return 0
    return sum(p.numel() for p in model.parameters())


def read_weights(path: str | Path) -> dict:
    """Names and shapes of the tensors in a weights file, read without running any code.

    safetensors files are read from their header; others with torch's `weights_only=True`, which
    refuses pickled objects other than tensors instead of executing them.

    Raises:
        ImgclfError: The file is missing, unreadable, damaged or holds code.
    """
    import pickle

    import torch

    path = Path(path)
    shown = display_path(path)
    if not path.is_file():
        raise ImgclfError(f"weights file {shown} does not exist: check the path given to "
                          "--weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ImgclfError(f"weights file {shown} is not a valid safetensors file ({e}): "
                              "download it again") from None
    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        raise ImgclfError(f"weights file {shown} holds pickled objects other than tensors; "
                          "refused rather than run: pass a safetensors or plain state-dict file"
                          ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ImgclfError(f"weights file {shown} cannot be read ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]}): download it again") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ImgclfError(f"weights file {shown} holds a {type(obj).__name__}, not a state dict: "
                          "pass a file of named tensors")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in obj.items()
            if isinstance(v, torch.Tensor)}


def weights_problems(weights: str | Path | None, arch: str, num_classes: int) -> list[str]:
    """A --weights file exists, is safe to read and fits the architecture (the classifier, which
    is replaced, aside)."""
    if weights is None:
        return []
    try:
        found = read_weights(weights)
    except ImgclfError as e:
        return [str(e)]
    try:
        model = _meta_model(arch, num_classes)
    except Exception:  # noqa: BLE001 - an unknown name is reported by models.create_model
        return []
    head = str(model.default_cfg.get("classifier") or "")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (head and k.startswith(head + "."))}
    shown = display_path(weights)
    common = [k for k in expected if k in found]
    if not common:
        return [f"weights file {shown} holds none of the {len(expected)} tensors of '{arch}' "
                f"(it has {len(found)} others): pass the weights of '{arch}', or the --model "
                "they belong to"]
    wrong = [k for k in common if found[k] != expected[k] and not any(a in k for a in _ADAPTED)]
    if wrong:
        k = wrong[0]
        return [f"weights file {shown} does not fit '{arch}': {len(wrong)} tensors have other "
                f"shapes (e.g. {k}: file {list(found[k])}, model {list(expected[k])}): pass the "
                f"weights of '{arch}', or the --model they belong to"]
    return []
