"""Accuracy and speed of the default recipe on the two reference data sets (issue 2).

    .venv/bin/python benchmarks/foundation.py [--only fridge|caltech] [--epochs N]

Trains with default settings, `--model tf_efficientnet_lite0` and the local ImageNet weights:
fridgeObjects (class folders, seeded 20% validation) and caltech101_subset (train/ and test/,
test used for validation). Prints validation accuracy, wall time and training images/s, then
checks that `predict` reproduces predictions.csv.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
SETS = {"fridge": (SHARED / "data" / "fridgeObjects", 0.95),
        "caltech": (SHARED / "data" / "caltech101_subset", 0.85)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--epochs", type=int, default=None, help="override the default (5)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "imgclf-cache"))
    import imgclf
    from imgclf import api

    out = Path(args.out or tempfile.mkdtemp(prefix="imgclf-bench-"))
    rows = []
    for name, (data, target) in SETS.items():
        if args.only and name != args.only:
            continue
        if not data.is_dir() or not WEIGHTS.is_file():
            print(f"skip {name}: {data} or {WEIGHTS} missing")
            continue
        opts = {"epochs": args.epochs} if args.epochs else {}
        t0 = time.perf_counter()
        run = api.train(data, model="tf_efficientnet_lite0", weights=str(WEIGHTS), out=str(out),
                        name=name, **opts)
        wall = time.perf_counter() - t0
        m = run.metrics()
        preds = run.predictions()
        res = imgclf.load(run.path).predict(preds.paths, batch_size=64)
        diff = float(np.abs(res.probs - preds.probs).max())
        rows.append((name, m["valid_accuracy"], target, wall, m["train_seconds"],
                     m["images_per_second"], m["valid_images"], diff))
    print()
    print(f"{'data':8} {'valid_acc':>9} {'target':>6} {'wall_s':>7} {'train_s':>7} "
          f"{'img/s':>6} {'n_valid':>7} {'predict_max_diff':>16}")
    for name, acc, target, wall, tr, ips, nv, diff in rows:
        print(f"{name:8} {acc:9.4f} {target:6.2f} {wall:7.1f} {tr:7.1f} {ips:6.1f} {nv:7d} "
              f"{diff:16.2e}  {'PASS' if acc >= target and diff < 1e-4 else 'FAIL'}")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
