"""Training that can be killed at any step and resumed into exactly the run it would have been.

Lightning restores weights, optimizer, schedule and loop counters from a checkpoint, but not the
random state that decides which images come next and how they are augmented. Here that state is
never carried at all: it is a pure function of (seed, epoch, position).

- `ResumableSampler` draws epoch e's order from a generator seeded with (seed, e), and can start
  part-way through an epoch.
- `SeededDataset` transforms the image at position p of epoch e under its own seed, so its crop and
  flip do not depend on what came before (nor on which loader process draws it).
- `ResumeState`, a callback saved in every checkpoint, records how far into the epoch training got
  (and the epoch's summed loss and time, for metrics.csv), tells the sampler where to continue, and
  reseeds the global generators before every step so dropout is a function of (seed, epoch, step).

`ResumeState` and `StepCheckpoint` are Lightning callbacks, so they live in
`imgclf.training.engine` (the one module that imports Lightning); the seeded sampler and dataset
they work with stay here.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, via splitmix64, so neighbouring inputs give unrelated seeds."""
    x = 0
    for v in values:
        x = (x ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


def seed_all(seed: int) -> None:
    """Seed torch (every device), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ResumableSampler(Sampler):
    """Training order that depends only on (seed, epoch) and can restart mid-epoch.

    Yields (index, augmentation seed) keys for `SeededDataset`.

    Args:
        n: Number of training images.
        seed: The run's seed.
        inner: Optional sampler whose order to use instead of a shuffle (e.g. class-balanced
            draws); its `generator`, if it has one, is reseeded with (seed, epoch) every epoch.
    """

    def __init__(self, n: int, seed: int, inner: Sampler | None = None):
        self.n, self.seed, self.inner = n, seed, inner
        self.epoch = 0
        self._start = 0  # positions of `epoch` already trained on (set by `resume_at`)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start = epoch, 0

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Continue after `consumed` positions of `epoch` (the next epoch if that was all)."""
        if consumed >= len(self):
            self.epoch, self._start = epoch + 1, 0
        else:
            self.epoch, self._start = epoch, consumed

    def order(self, epoch: int) -> list[int]:
        """The indices of one epoch, in training order."""
        if self.inner is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            return torch.randperm(self.n, generator=g).tolist()
        gen = getattr(self.inner, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(mix_seed(self.seed, epoch))
        return [int(i) for i in self.inner]

    def __iter__(self):
        epoch, start = self.epoch, self._start
        # Counting passes keeps epochs apart where nobody calls set_epoch (a wrapping sampler).
        self.epoch, self._start = epoch + 1, 0
        order = self.order(epoch)
        for pos in range(start, len(order)):
            yield order[pos], mix_seed(self.seed, epoch, pos)


class SeededDataset(Dataset):
    """A dataset indexed by (index, seed) keys: each item is transformed under its own seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        # Only this process's CPU generators: augmentations run on CPU, and reseeding CUDA per
        # image would cost a device call each time.
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return self.dataset[index]
