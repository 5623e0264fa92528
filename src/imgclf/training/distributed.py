"""Several processes, one run: which process is which before Lightning knows, and whole-set validation.

With `strategy="ddp"` every process runs `imgclf train` from the start: Lightning's own launcher
re-runs the command line once per extra device when `trainer.fit` is reached, and torchrun or SLURM
start every process themselves. So each process must decide, before any process group exists,
whether it is global rank 0: only rank 0 creates and writes the run directory, caches features,
runs the learning-rate finder and trains the frozen-stage head. The others skip all of that; DDP
copies rank 0's weights to them when it wraps the model, and `ClassifierModule` takes rank 0's
learning rates when it builds the optimiser.

Validation shards carry each image's position, so the gathered predictions can be put back in
order and the duplicates that DistributedSampler pads shards with can be dropped.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from imgclf.errors import ImgclfError

RUN_DIR_ENV = "IMGCLF_RUN_DIR"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def launch_rank(num_nodes: int = 1) -> int:
    """This process's global rank as its launcher announced it (0 when launched alone).

    Read as Lightning's cluster environments read it: torchrun's RANK; SLURM_PROCID inside a
    SLURM job with several tasks; else Lightning's own launcher (NODE_RANK, LOCAL_RANK and
    WORLD_SIZE, which it sets for the processes it starts). A process started by hand on a
    second machine with NODE_RANK=1 is not rank 0 either.

    Args:
        num_nodes: Machines taking part, to turn (node, local rank) into a global rank.
    """
    rank = _int_env("RANK")
    if rank is not None:
        return rank
    if (_int_env("SLURM_NTASKS") or 0) > 1 and _int_env("SLURM_PROCID") is not None \
            and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return _int_env("SLURM_PROCID") or 0
    node = _int_env("NODE_RANK") or _int_env("GROUP_RANK") or 0
    local = _int_env("LOCAL_RANK") or 0
    world = _int_env("WORLD_SIZE")
    per_node = world // max(1, num_nodes) if world else 1
    return node * per_node + local


def is_rank_zero(num_nodes: int = 1) -> bool:
    """Whether this process is global rank 0 (the one that writes the run directory)."""
    return launch_rank(num_nodes) == 0


def wants_several_processes(cfg) -> bool:
    """Whether a config asks for more than one training process."""
    devices = cfg.devices
    many_devices = (isinstance(devices, int) and devices > 1) or (
        isinstance(devices, str) and ("," in devices or devices.strip() == "-1"
                                      or (devices.isdigit() and int(devices) > 1)))
    return int(cfg.num_nodes) > 1 or many_devices or str(cfg.strategy).startswith("ddp")


class IndexedDataset(Dataset):
    """Items of `dataset` with their position appended: (x, y) -> (x, y, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], torch.tensor(i, dtype=torch.long))


def restore_order(index: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows sorted by dataset position, each position once (padding duplicates dropped).

    Args:
        index: Dataset position of every gathered row.
        *tensors: Gathered rows, in the same order as `index`.
    """
    _, first = np.unique(index.cpu().numpy(), return_index=True)
    keep = torch.as_tensor(first, dtype=torch.long, device=index.device)
    return [t[keep.to(t.device)] for t in tensors]


def local_processes(cfg) -> int:
    """Training processes this machine runs for a config (devices per node)."""
    devices = cfg.devices
    if isinstance(devices, int):
        return max(1, devices)
    text = str(devices).strip()
    if text.isdigit():
        return max(1, int(text))
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return 1


def share_cores(cfg) -> None:
    """Split this machine's cores among its training processes (CPU DDP would oversubscribe)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local_processes(cfg)))


def check_strategy(cfg) -> None:
    """Refuse launchers that train in child processes, whose results never reach the run.

    Raises:
        ImgclfError: A spawn or fork strategy was asked for.
    """
    name = str(cfg.strategy)
    if "spawn" in name or "fork" in name or name == "ddp_notebook":
        raise ImgclfError(f"--strategy {name} trains in child processes and is not supported: "
                          "use --strategy ddp from the command line or a script (torchrun and "
                          "SLURM work too; see the README's multi-GPU section)")
