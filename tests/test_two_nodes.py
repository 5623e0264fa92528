"""Two "machines" on this one: two processes started by hand with `--num-nodes 2`, NODE_RANK 0
and 1 and a loopback MASTER_ADDR, as on a real cluster without a launcher (Lightning's
environment variables), against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import make_color_dataset, read_csv_rows

# GroupNorm: BatchNorm statistics are per process, a real but separate difference (test_ddp).
MODEL = "test_efficientnet_gn"
FLAGS = ["--model", MODEL, "--pretrained", "--size", "32", "--epochs", "3", "--freeze-epochs",
         "1", "--seed", "0", "--workers", "0", "--accelerator", "cpu"]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
               "MASTER_PORT", "IMGCLF_RUN_DIR", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path, gn_weights):
    data = make_color_dataset(tmp_path / "data", per_class=16)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    common = [sys.executable, "-m", "imgclf.cli", "train", str(data), *FLAGS, "--weights",
              str(gn_weights), "--cache-dir", str(tmp_path / "cache")]

    one = subprocess.run([*common, "--batch-size", "8", "--out", str(tmp_path / "one"),
                          "--name", "one"], capture_output=True, text=True, timeout=600, env=base)
    assert one.returncode == 0, one.stderr[-3000:]

    # Node 0 and node 1, one process each, 4 images per step each: a global batch of 8.
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        (tmp_path / f"tmp{node}").mkdir()
        env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node),
               "TMPDIR": str(tmp_path / f"tmp{node}")}
        procs.append(subprocess.Popen(
            [*common, "--batch-size", "4", "--num-nodes", "2", "--devices", "1", "--strategy",
             "ddp", "--out", str(tmp_path / "nodes"), "--name", "two-nodes"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    a, b = tmp_path / "one" / "one", tmp_path / "nodes" / "two-nodes"
    # Node 0 alone wrote the run; node 1 said nothing and left no scratch folder.
    assert [p.name for p in (tmp_path / "nodes").iterdir()] == ["two-nodes"]
    assert outs[0][1].count("Done in") == 1 and "Done in" not in outs[1][1]
    assert not list((tmp_path / "tmp1").glob("imgclf-rank-*"))
    m_one = json.loads((a / "metrics.json").read_text())
    m_two = json.loads((b / "metrics.json").read_text())
    p_one, p_two = read_csv_rows(a / "predictions.csv"), read_csv_rows(b / "predictions.csv")
    assert [x["path"] for x in p_two] == [x["path"] for x in p_one]
    assert m_two["valid_images"] == m_two["valid_n_samples"] == len(p_two)
    assert [(r["epoch"], r["stage"]) for r in read_csv_rows(b / "metrics.csv")] == [
        (r["epoch"], r["stage"]) for r in read_csv_rows(a / "metrics.csv")]
    # The same data, global batch, learning rate and schedule; the batches are made of other
    # images (each node draws its shard), so the numbers agree to a tolerance, not exactly.
    assert m_two["lr"] == pytest.approx(m_one["lr"])
    assert m_one["valid_accuracy"] >= 0.9 and m_two["valid_accuracy"] >= 0.9
    assert abs(m_two["valid_accuracy"] - m_one["valid_accuracy"]) <= 0.1
    assert abs(m_two["valid_loss"] - m_one["valid_loss"]) <= 0.2
