"""Torch datasets over decoded images, and loader settings chosen for the machine."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from imgclf.data.cache import DecodedImages


class ImageDataset(Dataset):
    """Presized uint8 images with their targets, transformed on access.

    Args:
        images: The decoded images.
        indices: Which of `images` belong to this dataset.
        targets: One target per index (class index or multi-hot row); None for unlabelled pools.
        transform: uint8 [3, P, P] tensor -> uint8 [3, S, S] tensor.
    """

    def __init__(
        self,
        images: DecodedImages,
        indices: Sequence[int],
        targets: torch.Tensor | None,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.images = images
        self.indices = list(indices)
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x = self.transform(torch.from_numpy(self.images.get(self.indices[i])))
        if self.targets is None:
            return x.contiguous(), torch.tensor(-1)
        return x.contiguous(), self.targets[i]


def with_transform(dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> Dataset:
    """The same images and targets under another transform (e.g. a progressive-resizing size).

    Works through `ConcatDataset`s; the images themselves are shared, not copied.
    """
    import copy

    from torch.utils.data import ConcatDataset

    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([with_transform(d, transform) for d in dataset.datasets])
    if isinstance(dataset, ImageDataset):
        out = copy.copy(dataset)
        out.transform = transform
        return out
    raise TypeError(f"cannot change the transform of a {type(dataset).__name__}")


def default_workers() -> int:
    """Loader processes: none on small machines, where workers would steal the compute's cores.

    Decoding happens once in the decode cache, so a worker only crops and flips a uint8 array
    (about a millisecond an image); on 2 cores that is cheaper in the main process.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 2)


def train_steps(n: int, batch_size: int) -> int:
    """Steps in an epoch of a training loader from `make_loader`, which drops a ragged last
    batch when there is more than one batch."""
    return n // batch_size if n > batch_size else 1


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int | None = None,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader; training loaders shuffle (seeded) and drop a ragged last batch."""
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator if train else None,
        pin_memory=torch.cuda.is_available(),
    )
