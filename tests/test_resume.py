"""Kill training at any moment, resume it, and get exactly the run that was never interrupted.

The reference is one uninterrupted run. Crashes are made two ways: in this process, by raising
from the checkpoint writer at a chosen checkpoint (exact, and cheap), and once for real: a CLI
subprocess killed with SIGKILL part-way through an epoch, then `imgclf train --resume`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf import api
from imgclf.commands import train as train_cmd
from imgclf.training import engine
from imgclf.errors import ImgclfError
from imgclf.training.engine import ResumeState
from imgclf.training.resume import ResumableSampler, SeededDataset, mix_seed

# 36 images, 28 for training at batch 4: 7 steps an epoch; a step checkpoint every 3 steps.
RUN = dict(model="test_efficientnet", size=32, epochs=2, freeze_epochs=1, batch_size=4,
           lr=0.01, seed=0, deterministic=True, checkpoint_every=3, valid_pct=0.2,
           precision="32")  # bf16 autocast with deterministic kernels is ~5x slower on CPU
STEPS_PER_EPOCH = 7
COMPARED = ("valid_accuracy", "valid_loss", "valid_f1_macro", "best_epoch", "best_stage")


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up handles it."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The data, a local weights file (so the frozen stage runs) and the uninterrupted run."""
    import timm
    from conftest import make_color_dataset
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("resume")
    data = make_color_dataset(root / "data", per_class=12)
    torch.manual_seed(1)
    net = timm.create_model("test_efficientnet", pretrained=False)
    weights = root / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    opts = {**RUN, "cache_dir": str(root / "cache"), "weights": str(weights)}
    reference = api.train(data, out=str(root / "runs"), name="reference", **opts)
    return data, opts, root, reference.path


def read_metrics(run: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    return {k: metrics[k] for k in COMPARED}, rows


def crash_at(monkeypatch, n: int, before: bool) -> None:
    """Make the n-th checkpoint write crash the run, just before or just after the file lands."""
    save = engine.AtomicCheckpointIO.save_checkpoint
    count = {"n": 0}

    def crashing(self, checkpoint, path, storage_options=None):
        count["n"] += 1
        if before and count["n"] == n:
            raise Killed
        save(self, checkpoint, path, storage_options)
        if not before and count["n"] == n:
            raise Killed

    monkeypatch.setattr(engine.AtomicCheckpointIO, "save_checkpoint", crashing)


@pytest.mark.parametrize("n, before, where", [
    (1, True, "after the frozen stage, before the first unfrozen checkpoint"),
    (3, True, "after epoch 0's row and best were written, before its checkpoint"),
])
@pytest.mark.slow
def test_crash_then_resume_equals_uninterrupted(setup, monkeypatch, n, before, where):
    data, opts, root, reference = setup
    name = f"crash-{n}-{'before' if before else 'after'}"
    with monkeypatch.context() as m, pytest.raises(Killed):
        crash_at(m, n, before)
        api.train(data, out=str(root / "runs"), name=name, **opts)
    run = root / "runs" / name
    assert not (run / "metrics.json").exists(), where
    api.train(resume=run)
    assert read_metrics(run) == read_metrics(reference), where


@pytest.mark.slow
def test_sigkill_mid_epoch_then_cli_resume_equals_uninterrupted(setup, tmp_path):
    """A real `imgclf train` killed with SIGKILL in the middle of an epoch, then resumed."""
    data, opts, root, reference = setup
    flags = ["--model", RUN["model"], "--size", "32", "--epochs", "2", "--freeze-epochs", "1",
             "--batch-size", "4", "--lr", "0.01", "--seed", "0", "--deterministic",
             "--precision", "32",
             "--checkpoint-every", "3", "--weights", opts["weights"],
             "--cache-dir", opts["cache_dir"]]
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "imgclf.cli"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "train", str(data), *flags, "--out", str(tmp_path),
                             "--name", "killed"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (run / "metrics.json").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] % STEPS_PER_EPOCH != 0, "the kill should land mid-epoch"

    resumed = subprocess.run([*cmd, "train", "--resume", str(run)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert read_metrics(run) == read_metrics(reference)


def test_resuming_a_finished_run_changes_nothing(setup):
    _, _, _, reference = setup
    before = (reference / "metrics.json").read_bytes()
    api.train(resume=reference)
    assert (reference / "metrics.json").read_bytes() == before


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(ImgclfError, match="not a run directory"):
        api.train(resume=tmp_path)


def test_damaged_best_files_are_a_clear_error(setup, tmp_path):
    _, _, _, reference = setup
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    (run / "checkpoints" / best["weights"]).write_bytes(b"\x00" * 100)
    with pytest.raises(ImgclfError, match="safetensors"):
        train_cmd.load_best(run)


def test_best_files_are_replaced_as_a_set(setup):
    """best.json names the weights and probabilities of its own epoch; older sets are gone."""
    _, _, _, reference = setup
    ck = reference / "checkpoints"
    best = json.loads((ck / "best.json").read_text())
    assert sorted(p.name for p in ck.glob("best-*")) == sorted([best["weights"], best["probs"]])
    loaded = train_cmd.load_best(reference)
    assert loaded.epoch == best["epoch"] and loaded.state and loaded.probs.ndim == 2


# --- the pieces ----------------------------------------------------------------------------


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    b.set_epoch(1)
    a_first = list(a)  # epoch 0, then a counts on to epoch 1 by itself
    assert list(a) == list(b)
    assert sorted(i for i, _ in a_first) == list(range(50))
    assert [i for i, _ in a_first] != [i for i, _ in ResumableSampler(50, seed=4)]


def test_resume_at_continues_the_same_epoch_where_it_stopped():
    full = list(ResumableSampler(20, seed=0))
    s = ResumableSampler(20, seed=0)
    s.resume_at(epoch=0, consumed=8)
    assert list(s) == full[8:]
    s.resume_at(epoch=0, consumed=20)  # the epoch was complete: the next one starts
    nxt = ResumableSampler(20, seed=0)
    nxt.set_epoch(1)
    assert list(s) == list(nxt)


def test_inner_sampler_is_reseeded_per_epoch():
    from torch.utils.data import WeightedRandomSampler

    def inner():
        return WeightedRandomSampler(torch.ones(10).double(), 10, generator=torch.Generator())

    a, b = ResumableSampler(10, 5, inner()), ResumableSampler(10, 5, inner())
    list(a)  # a's generator has moved on; b starts at epoch 1 directly
    b.set_epoch(1)
    assert list(a) == list(b)


def test_seeded_dataset_augments_by_key_not_by_history():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(4)

    ds = SeededDataset(Noise())
    first = ds[(1, 99)]
    torch.rand(100)  # whatever ran in between
    assert torch.equal(ds[(1, 99)], first)
    assert not torch.equal(ds[(1, 98)], first)


def test_resume_state_round_trip_positions_the_sampler():
    sampler = ResumableSampler(40, seed=0)
    state = ResumeState(sampler, seed=0, batch_size=4)
    state.load_state_dict({"epoch": 2, "batches": 3, "images": 12, "loss_sum": 6.0,
                           "seconds": 1.5})
    assert state.mean_loss() == 0.5 and state.seconds() >= 1.5
    assert sampler.epoch == 2 and len(list(sampler)) == 40 - 12


def test_mix_seed_spreads_neighbours():
    seeds = {mix_seed(0, e, p) for e in range(10) for p in range(100)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert np.std([s / 2**63 for s in seeds]) > 0.25


@pytest.mark.slow
def test_ctrl_c_while_caching_features_says_how_to_resume(setup):
    """Ctrl-C before any epoch (feature caching, the LR finder): a clear line, then --resume."""
    import contextlib

    from imgclf import progress

    data, opts, root, reference = setup

    @contextlib.contextmanager
    def ctrl_c_on_caching(description, total=None):
        if description.startswith("Caching body features"):
            raise KeyboardInterrupt
        yield lambda n=1: None

    with progress.reporting(ctrl_c_on_caching), pytest.raises(ImgclfError, match=(
            r"training stopped before any epoch finished.*imgclf train --resume")):
        api.train(data, out=str(root / "runs"), name="ctrl-c", **opts)
    api.train(resume=root / "runs" / "ctrl-c")
    assert read_metrics(root / "runs" / "ctrl-c") == read_metrics(reference)


@pytest.mark.slow
def test_metrics_count_epochs_as_the_options_do(setup):
    _, _, _, reference = setup
    metrics = json.loads((reference / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["freeze_epochs"]) == (RUN["epochs"], RUN["freeze_epochs"])
