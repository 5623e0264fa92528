"""imgclf vs fastai vs a plain PyTorch + timm loop, side by side (issue 7). Run by hand:

    make bench-deps                       # installs benchmarks/requirements.txt (fastai) into .venv
    .venv/bin/python benchmarks/peers.py [--epochs 5] [--only fridge|caltech] [--skip fastai]

Same model (tf_efficientnet_lite0, local ImageNet weights), same train/valid split (imgclf's
seeded split, handed to the peers as file lists), same number of epochs (one frozen + E
unfrozen for imgclf and fastai's `fine_tune(E)`; E + 1 epochs for the plain loop). Each
framework runs in its own subprocess so peak memory (max RSS) is its own. Prints wall time,
training images/s, final and best validation accuracy, peak memory and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
DATA = {"fridge": SHARED / "data" / "fridgeObjects",
        "caltech": SHARED / "data" / "caltech101_subset"}
ARCH = "tf_efficientnet_lite0"


def split_lists(data: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """imgclf's split of `data` as (path, label) lists: what every framework trains on."""
    from imgclf.data.sources import load_source

    table = load_source(data, valid_pct=0.2, seed=42)
    tr = [(str(s.path), s.label) for s in table.split("train")]
    va = [(str(s.path), s.label) for s in table.split("valid")]
    return tr, va, list(table.classes)


def run_imgclf(data: Path, epochs: int, out: Path) -> dict:
    from imgclf import api

    t0 = time.perf_counter()
    run = api.train(data, model=ARCH, weights=str(WEIGHTS), epochs=epochs, freeze_epochs=1,
                    out=str(out), name=f"imgclf-{data.name}", seed=42)
    wall = time.perf_counter() - t0
    hist = run.history()
    accs = [r["valid_accuracy"] for r in hist]
    return {"wall_s": wall, "final_acc": accs[-1], "best_acc": max(accs),
            "kept_acc": run.metrics()["valid_accuracy"], "epochs_run": len(hist)}


def run_fastai(data: Path, epochs: int, out: Path) -> dict:
    import pandas as pd
    from fastai.vision.all import (CategoryBlock, ColReader, ColSplitter, DataBlock, ImageBlock,
                                   Resize, accuracy, aug_transforms, vision_learner)

    tr, va, _ = split_lists(data)
    df = pd.DataFrame([(p, l, False) for p, l in tr] + [(p, l, True) for p, l in va],
                      columns=["path", "label", "is_valid"])
    t0 = time.perf_counter()
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ColReader("path"),
                      get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                      item_tfms=Resize(460), batch_tfms=aug_transforms(size=224, min_scale=0.75))
    dls = block.dataloaders(df, bs=64, num_workers=0)
    learn = vision_learner(dls, ARCH, metrics=accuracy, pretrained=True,
                           pretrained_cfg_overlay={"file": str(WEIGHTS)})
    learn.path = out
    learn.fine_tune(epochs)
    wall = time.perf_counter() - t0
    accs = [float(v[2]) for v in learn.recorder.values]
    return {"wall_s": wall, "final_acc": accs[-1], "best_acc": max(accs),
            "epochs_run": len(accs)}


def run_plain(data: Path, epochs: int, out: Path) -> dict:
    """The PyTorch transfer-learning tutorial's loop with a timm model: SGD, StepLR, PIL."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    tr, va, classes = split_lists(data)
    index = {c: i for i, c in enumerate(classes)}
    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    tf_train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    tf_valid = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])

    class Files(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            p, label = self.items[i]
            return self.tf(Image.open(p).convert("RGB")), index[label]

    t0 = time.perf_counter()
    torch.manual_seed(42)
    model = timm.create_model(ARCH, pretrained=True, num_classes=len(classes),
                              pretrained_cfg_overlay={"file": str(WEIGHTS)})
    dl_tr = torch.utils.data.DataLoader(Files(tr, tf_train), batch_size=32, shuffle=True,
                                        num_workers=0)
    dl_va = torch.utils.data.DataLoader(Files(va, tf_valid), batch_size=64, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    accs = []
    for _ in range(epochs + 1):
        model.train()
        for x, y in dl_tr:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in dl_va:
                correct += int((model(x).argmax(1) == y).sum())
        accs.append(correct / len(va))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "final_acc": accs[-1], "best_acc": max(accs), "epochs_run": len(accs)}


WORKERS = {"imgclf": run_imgclf, "fastai": run_fastai, "plain": run_plain}


def worker(name: str, data: str, epochs: int, out: str) -> None:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    result = WORKERS[name](DATA[data], epochs, Path(out))
    tr, _, _ = split_lists(DATA[data])
    result["images_per_s"] = len(tr) * (epochs + 1) / result["wall_s"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--only", choices=sorted(DATA))
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(WORKERS))
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--data", choices=sorted(DATA))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", tempfile.mkdtemp(prefix="imgclf-peers-cache-"))
    if args.worker:
        worker(args.worker, args.data, args.epochs, args.out)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="imgclf-peers-"))
    results: dict[tuple[str, str], dict] = {}
    for data in sorted(DATA):
        if args.only and data != args.only:
            continue
        for name in ("imgclf", "fastai", "plain"):
            if name in args.skip:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--data", data,
                   "--epochs", str(args.epochs), "--out", str(out / f"{name}-{data}")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{name} on {data} failed:\n{proc.stderr[-3000:]}")
                continue
            results[(name, data)] = json.loads(line[-1][7:])
            print(f"{name:7} {data:8} done: {results[(name, data)]}", flush=True)
    print(f"\nepochs: 1 frozen + {args.epochs} (plain loop: {args.epochs + 1} full epochs); "
          f"model {ARCH}; cores {len(os.sched_getaffinity(0))}")
    print(f"{'data':8} {'tool':7} {'wall_s':>7} {'img/s':>6} {'final_acc':>9} {'best_acc':>8} "
          f"{'peak_MB':>8} {'wall vs imgclf':>14}")
    for data in sorted(DATA):
        base = results.get(("imgclf", data))
        for name in ("imgclf", "fastai", "plain"):
            r = results.get((name, data))
            if not r:
                continue
            ratio = f"{r['wall_s'] / base['wall_s']:.2f}x" if base else "-"
            print(f"{data:8} {name:7} {r['wall_s']:7.1f} {r['images_per_s']:6.1f} "
                  f"{r['final_acc']:9.4f} {r['best_acc']:8.4f} {r['peak_rss_mb']:8.0f} {ratio:>14}")
        for peer in ("fastai", "plain"):
            r = results.get((peer, data))
            if base and r:
                print(f"{data:8} imgclf/{peer}: wall {base['wall_s'] / r['wall_s']:.2f}, "
                      f"final accuracy {base['final_acc']:.4f} vs {r['final_acc']:.4f}")


if __name__ == "__main__":
    main()
