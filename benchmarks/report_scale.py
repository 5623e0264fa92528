"""How long report.html takes to build, how big it gets and how fast it opens, at scale (issue 4).

    .venv/bin/python benchmarks/report_scale.py [--images 10000] [--classes 101] [--out DIR]

Builds a synthetic run directory (no training): N generated 160x120 JPEGs in C class folders,
seeded softmax outputs with about 20% errors, a random-init tf_efficientnet_lite0 bundle at 224 px
(for realistic heatmap cost) and the usual side files. Then prints the time `write_report`
takes, the size of report.html, the number of embedded images, and the time headless Chromium
needs to load it (when `chromium` is installed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def make_run(root: Path, n: int, n_classes: int, seed: int = 0) -> Path:
    import timm
    from PIL import Image

    from imgclf import evaluation
    from imgclf.deploy.bundle import save_bundle
    from imgclf.config import TrainConfig
    from imgclf.data.transforms import Preprocess
    from imgclf.data.validate import CheckReport, DataSummary
    from imgclf.io import atomic_write_json
    from imgclf.rundir import write_rows_csv

    rng = np.random.default_rng(seed)
    classes = [f"class_{j:03d}" for j in range(n_classes)]
    targets = np.arange(n) % n_classes
    paths = []
    base = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for i in range(n):
        path = root / "data" / classes[targets[i]] / f"{i:05d}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=85)
        paths.append(str(path))
    run = root / "run"
    TrainConfig(data=str(root / "data"), model="tf_efficientnet_lite0").to_yaml(run / "config.yaml")
    logits = rng.normal(0, 1.5, (n, n_classes)) + 4.0 * np.eye(n_classes)[targets]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    preds = evaluation.Predictions(paths=paths, classes=classes, probs=probs.astype(np.float32),
                                   targets=targets)
    preds.to_csv(run / "predictions.csv")
    rows = [{"epoch": e, "stage": "frozen" if e == 0 else "unfrozen", "lr": 1e-3,
             "train_loss": 2.0 / (e + 1), "valid_loss": 2.2 / (e + 1),
             "valid_accuracy": 0.5 + 0.05 * e, "seconds": 60.0 * (e + 1)} for e in range(6)]
    write_rows_csv(run / "metrics.csv", rows)
    scores = evaluation.metrics(preds)
    atomic_write_json(run / "metrics.json", {
        **{f"valid_{k}": v for k, v in scores.items() if not isinstance(v, (dict, list))},
        "model": "tf_efficientnet_lite0", "task": "single_label", "epochs": 6, "best_epoch": 5})
    counts = {c: int((targets == j).sum()) for j, c in enumerate(classes)}
    summary = DataSummary(classes=classes, multi_label=False, images={"train": 4 * n, "valid": n},
                          counts={"train": {c: 4 * v for c, v in counts.items()}, "valid": counts},
                          imbalance_ratio=1.0, imbalanced=False)
    atomic_write_json(run / "data_summary.json", {"summary": summary.to_dict(),
                                                   "checks": CheckReport(checked=5 * n).to_dict()})
    lrs = np.logspace(-6, 0, 100)
    atomic_write_json(run / "lr_find.json", {"lrs": lrs.tolist(),
                                             "losses": (4 - np.log10(lrs) * 0.2).tolist(),
                                             "suggestion": 1e-3, "rule": "valley"})
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=n_classes)
    save_bundle(run / "model", model, "tf_efficientnet_lite0", classes, False,
                Preprocess(size=224, presize=256, mean=(0.5,) * 3, std=(0.5,) * 3))
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from imgclf.report.html import write_report

    root = Path(args.out or tempfile.mkdtemp(prefix="imgclf-report-bench-"))
    t = time.perf_counter()
    run = make_run(root, args.images, args.classes)
    print(f"synthetic run: {args.images} validation images, {args.classes} classes "
          f"({time.perf_counter() - t:.1f} s to build) in {run}")
    for heatmaps in (False, True):
        t = time.perf_counter()
        path = write_report(run, heatmaps=heatmaps)
        took = time.perf_counter() - t
        page = path.read_text(encoding="utf-8")
        print(f"write_report(heatmaps={heatmaps}): {took:.1f} s, report.html "
              f"{path.stat().st_size / 1e6:.2f} MB, {len(re.findall(r'<img ', page))} images")
    chromium = shutil.which("chromium")
    if chromium:
        t = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        f"--user-data-dir={root / 'profile'}", "--dump-dom", path.as_uri()],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=300)
        print(f"chromium --headless --dump-dom (start, load, render, exit): "
              f"{time.perf_counter() - t:.1f} s")
    plots = sorted((run / "plots").glob("*.png"))
    print("plots/: " + ", ".join(f"{p.stem} {p.stat().st_size // 1024} KB" for p in plots))


if __name__ == "__main__":
    main()
