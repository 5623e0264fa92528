"""Keep glibc from handing large tensors back to the kernel between training steps.

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh mmap and returns it with munmap on free. A training step allocates and frees
activations of tens to hundreds of MiB, so each step maps fresh pages that the kernel must
fault in and zero. Measured on this project's 2-core machine (tf_efficientnet_lite0, batch 64,
224 px, float32 training steps, 6 steps, two repeats): 13 million minor page faults, 27-39 s of
kernel time against 44-49 s of user time, 4.7-11 img/s; with the thresholds raised, 25,000
faults, under 1 s of kernel time, 18-32 img/s. This is where the kernel's share of imgclf's CPU
time came from.

`uses_all_cores` also gives torch every core the process may use for the command's duration;
`one_thread()` takes them back for work too small to share.

`retain_freed_memory()` raises the thresholds for the duration of a call (the allocator keeps
freed blocks for reuse) and restores glibc's defaults afterwards, trimming what it kept, so
nothing process-wide outlives the call. On other C libraries it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's documented default for both
_RETAIN = 1 << 30  # blocks up to 1 GiB come from the heap and are kept after free
_lock = threading.Lock()
_depth = 0


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def retain_freed_memory() -> Iterator[None]:
    """For the duration of the block, freed large blocks stay in the process for reuse.

    Nested and concurrent uses share one setting; the outermost exit restores glibc's
    defaults and returns the kept memory to the system.
    """
    global _depth
    libc = _libc()
    if libc is None or os.environ.get("IMGCLF_SYSTEM_MALLOC"):
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _RETAIN)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Hand the memory glibc holds in free blocks back to the system (malloc_trim)."""
    libc = _libc()
    if libc is not None:
        with _lock:
            if _depth == 0:  # inside retain_freed_memory, keeping it is the point
                libc.malloc_trim(0)


def uses_all_cores(command):
    """Run `command` with torch on every core this process may use and the allocator keeping
    freed tensors' memory (imgclf.allocator: a threefold training speed-up on CPU), then restore
    the caller's thread count and allocator settings (a notebook's outlive the call unchanged)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count())
        torch.set_num_threads(max(1, cores or 1))
        try:
            with retain_freed_memory():
                return command(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch runs on one thread inside the block (its setting is restored on exit).

    For work too small to share between threads, where OpenMP's fork and join cost more than
    the work itself, and far more on a busy machine, where a thread waits until its partner is
    scheduled again. Measured on this project's 2-core CPU: an AdamW step of the frozen stage's
    1280 x 4 head on 32 features took 2.6 ms on two threads and 0.6 ms on one (25.7 ms against
    0.4 ms while another process kept a core busy); a Grad-CAM forward pass of one image through
    tf_efficientnet_lite0 took 0.12 s on one thread and 3-7 s on two with both cores loaded.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
