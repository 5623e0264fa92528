"""A real 2-process DDP run on CPU (gloo) against a 1-process run on the same data.

The DDP run goes through the command line because Lightning's `ddp` launcher starts the second
process by running the same command again; that re-run is exactly what torchrun and SLURM do too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import make_color_dataset, read_csv_rows
from imgclf.training import distributed
from imgclf.deploy.bundle import load as load_bundle

# GroupNorm instead of BatchNorm: with BatchNorm, two ranks of 4 images normalise differently
# from one process of 8 (SyncBatchNorm needs CUDA), which is a real but separate difference.
MODEL = "test_efficientnet_gn"
COMMON = dict(model=MODEL, size=32, epochs=3, freeze_epochs=1, lr="auto", seed=0, workers=0)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, gn_weights, monkeypatch):
    from imgclf import api

    data = make_color_dataset(tmp_path / "data", per_class=16)
    scratch_one, scratch_ddp = tmp_path / "tmp-one", tmp_path / "tmp-ddp"
    scratch_one.mkdir()
    scratch_ddp.mkdir()

    # One process, global batch 8.
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_one))
    one = api.train(data, out=str(tmp_path / "one"), name="one", weights=str(gn_weights),
                    batch_size=8, **COMMON).path
    monkeypatch.undo()

    # Two processes of 4 images each: the same global batch and number of steps.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", distributed.RUN_DIR_ENV)}
    env["TMPDIR"] = str(scratch_ddp)
    cmd = [sys.executable, "-m", "imgclf.cli", "train", str(data), "--model", MODEL,
           "--weights", str(gn_weights), "--size", "32", "--epochs", "3", "--freeze-epochs", "1",
           "--seed", "0", "--workers", "0", "--batch-size", "4", "--out", str(tmp_path / "ddp"),
           "--name", "ddp", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = tmp_path / "ddp" / "ddp"

    # The run directory was written once, by rank 0: one folder, one row per epoch, one
    # "Done" line (rank 1 prints nothing), no scratch run folder for rank 1.
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["ddp"]
    rows = read_csv_rows(ddp / "metrics.csv")
    assert [(r["epoch"], r["stage"]) for r in rows] == [
        ("0", "frozen"), ("1", "unfrozen"), ("2", "unfrozen"), ("3", "unfrozen")]
    assert r.stderr.count("Done in") == 1 and r.stderr.count("Learning-rate finder") == 1
    assert not list(scratch_ddp.glob("imgclf-rank-*"))
    # The LR finder ran in rank 0, and both processes trained at the rate it chose.
    assert (ddp / "lr_find.json").is_file()

    # Metrics cover the whole validation set, each image once, in the table's order.
    m_one = json.loads((one / "metrics.json").read_text())
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    p_one, p_ddp = read_csv_rows(one / "predictions.csv"), read_csv_rows(ddp / "predictions.csv")
    assert [x["path"] for x in p_ddp] == [x["path"] for x in p_one]
    assert m_ddp["valid_images"] == m_ddp["valid_n_samples"] == len(p_ddp) == len(set(
        x["path"] for x in p_ddp))
    # predictions.csv holds the probabilities the saved weights give for each of its rows, so
    # the gathered shards were put back in order and every rank held rank 0's weights.
    bundle = load_bundle(ddp)
    recorded = np.array([[float(x[f"prob_{c}"]) for c in bundle.classes] for x in p_ddp])
    again = bundle.predict([x["path"] for x in p_ddp], tta=0)
    np.testing.assert_allclose(again.probs, recorded, atol=1e-5)

    print(f"\n1 process:   valid_accuracy {m_one['valid_accuracy']:.4f}  valid_loss "
          f"{m_one['valid_loss']:.4f}  train {m_one['train_seconds']:.1f}s\n"
          f"2 processes: valid_accuracy {m_ddp['valid_accuracy']:.4f}  valid_loss "
          f"{m_ddp['valid_loss']:.4f}  train {m_ddp['train_seconds']:.1f}s")
    for label, rs in (("1 process", read_csv_rows(one / "metrics.csv")), ("2 processes", rows)):
        print(label, [(x["stage"], round(float(x["valid_loss"]), 4)) for x in rs])
    # Same data, same global batch and schedule; only the order of the batches differs.
    assert m_one["valid_accuracy"] >= 0.9 and m_ddp["valid_accuracy"] >= 0.9
    assert abs(m_ddp["valid_accuracy"] - m_one["valid_accuracy"]) <= 0.1
    assert abs(m_ddp["valid_loss"] - m_one["valid_loss"]) <= 0.2


def test_launch_rank_reads_the_launchers_environment(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS",
                "SLURM_PROCID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launch_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher, second device
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launch_rank(num_nodes=2) == 1
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launch_rank(num_nodes=2) == 2
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert not distributed.is_rank_zero(num_nodes=2)  # started by hand on the second machine
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert distributed.launch_rank() == 5
    monkeypatch.setenv("RANK", "3")  # torchrun wins
    assert distributed.launch_rank() == 3


def test_restore_order_drops_padding_and_sorts():
    import torch

    # Two shards of 5 validation images, interleaved, the second padded with image 0 again.
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    values = torch.tensor([[0.0], [2.0], [4.0], [1.0], [3.0], [0.0]])
    (restored,) = distributed.restore_order(index, values)
    assert restored.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_spawn_strategies_are_refused_before_training(tmp_path):
    from imgclf import api
    from imgclf.errors import ImgclfError

    data = make_color_dataset(tmp_path / "data", per_class=3)
    with pytest.raises(ImgclfError, match="--strategy ddp"):
        api.train(data, out=str(tmp_path / "runs"), model=MODEL, pretrained=False, size=32,
                  strategy="ddp_spawn", devices=2)
    assert not (tmp_path / "runs").exists()
