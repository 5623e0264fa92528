"""What `--deterministic` costs, and whether it repeats bit for bit (issue 8).

    .venv/bin/python benchmarks/determinism.py [--steps 8] [--batch 32] [--runs 2]

1. Training-step time of tf_efficientnet_lite0 at 224 px on this CPU, for float32 and bf16
   autocast, with `torch.use_deterministic_algorithms` off and on (what Lightning's
   `deterministic=True` sets). Configurations are interleaved and the median is printed, so a
   busy machine slows all of them alike.
2. With --runs N > 0: `imgclf train` on fridgeObjects_150px (2 unfrozen epochs after a frozen one,
   the local ImageNet weights) N times with `--seed 0 --deterministic`, and once without; prints
   training seconds and whether the deterministic runs' validation numbers are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "data" / "fridgeObjects_150px"


def step_times(steps: int, batch: int, rounds: int = 3) -> dict[str, float]:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,))
    configs = [(p, d) for p in ("float32", "bf16") for d in (False, True)]
    times: dict[str, list[float]] = {f"{p} deterministic={d}": [] for p, d in configs}
    for _ in range(rounds):
        for precision, det in configs:
            torch.use_deterministic_algorithms(det)
            for i in range(steps + 1):
                if i == 1:  # the first step pays one-off set-up costs
                    t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            times[f"{precision} deterministic={det}"].append((time.perf_counter() - t0) / steps)
    torch.use_deterministic_algorithms(False)
    return {k: statistics.median(v) for k, v in times.items()}


def train(out: Path, name: str, deterministic: bool) -> dict:
    cmd = [sys.executable, "-m", "imgclf.cli", "train", str(DATA), "--weights", str(WEIGHTS),
           "--epochs", "2", "--freeze-epochs", "1", "--seed", "0", "--out", str(out), "--name",
           name, "--cache-dir", str(out / "cache")] + (["--deterministic"] if deterministic else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / name / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (0: skip)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    from imgclf.training.models import cpu_supports_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 matrix units: {cpu_supports_bf16()}")
    times = step_times(args.steps, args.batch) if args.steps else {}
    for precision in ("float32", "bf16") if times else ():
        off, on = times[f"{precision} deterministic=False"], times[f"{precision} deterministic=True"]
        print(f"{precision:8s} step {off * 1000:7.0f} ms -> deterministic {on * 1000:7.0f} ms "
              f"({on / off:.2f}x)")

    if args.runs and DATA.is_dir() and WEIGHTS.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            train(out, "warm-cache", False)  # decode cache filled once, for every run below
            plain = train(out, "plain", False)
            det = [train(out, f"det{i}", True) for i in range(args.runs)]
            print(f"end to end ({DATA.name}, lite0, 1 frozen + 2 unfrozen epochs, "
                  f"precision {plain['precision']}):")
            print(f"  default        train {plain['train_seconds']:.1f}s  "
                  f"valid_loss {plain['valid_loss']!r}")
            for i, m in enumerate(det):
                print(f"  deterministic  train {m['train_seconds']:.1f}s  "
                      f"valid_loss {m['valid_loss']!r}  valid_accuracy {m['valid_accuracy']!r}")
            same = all(m["valid_loss"] == det[0]["valid_loss"] and
                       m["valid_accuracy"] == det[0]["valid_accuracy"] for m in det)
            print(f"  deterministic runs identical: {same}")


if __name__ == "__main__":
    main()
