"""imgclf's defaults against fastai's `fine_tune(3)` (and optionally a plain PyTorch + timm loop).

Run by hand, alone on an idle machine (any other job in another shell halves the speed):

    make bench-deps                       # installs benchmarks/requirements.txt (fastai) into .venv
    .venv/bin/python benchmarks/peers.py [--only fridge|caltech|imagenette] [--with-plain]
                                         [--fastai-epochs 3] [--imgclf-args "--epochs 5"]

Same model (tf_efficientnet_lite0, local ImageNet weights) and the same train/valid split
(imgclf's, handed to the peers as file lists). imgclf runs as the installed command with its
defaults (`imgclf train DATA --weights W`, exactly what a user types); fastai runs its
documented recipe, `fine_tune(3)` with `aug_transforms` after a 460 px item resize, in a Python
worker. Each tool runs in its own process, so the wall time is the whole process (interpreter
start, imports, data, training, imgclf's report, exit) and the peak memory (max RSS) and CPU
times are its own; what the benchmark itself measures (FLOPs, the matmul peak) runs in this
process afterwards. Prints wall time, final and best validation accuracy, peak memory and the
ratio imgclf / fastai.
"""

from __future__ import annotations

import argparse
import csv
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
        "caltech": SHARED / "data" / "caltech101_subset",
        "imagenette": SHARED / "data" / "imagenette2_224_subset"}
ARCH = "tf_efficientnet_lite0"


def split_lists(data: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """imgclf's split of `data` as (path, label) lists: what every framework trains on."""
    from imgclf.data.sources import load_source

    table = load_source(data, valid_pct=0.2, seed=42)
    tr = [(str(s.path), s.label) for s in table.split("train")]
    va = [(str(s.path), s.label) for s in table.split("valid")]
    return tr, va, list(table.classes)


def run_imgclf(data: Path, out: Path, extra: list[str]) -> dict:
    """`imgclf train` as a user runs it: the installed command in its own process, defaults
    unless `extra` says otherwise. Its wall time runs from the process's start to its exit;
    the phases come from when its progress lines arrive."""
    run_dir = out / f"imgclf-{data.name}"
    cmd = [str(Path(sys.executable).with_name("imgclf")), "train", str(data), "--model", ARCH,
           "--weights", str(WEIGHTS), "--out", str(out), "--name", run_dir.name, "--seed", "42",
           *extra]
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    for line in proc.stdout:
        marks.append((time.perf_counter() - t0, line.strip()))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        tail = "\n".join(m for _, m in marks[-30:])
        raise RuntimeError(f"imgclf failed on {data.name}:\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    accs = [float(r["valid_accuracy"]) for r in rows if r.get("valid_accuracy")]

    def at(prefix: str) -> float:
        return next((t for t, m in marks if m.startswith(prefix)), float("nan"))

    frozen = sum(float(r["seconds"]) for r in rows if r["stage"] == "frozen")
    unfrozen = [float(r["seconds"]) for r in rows if r["stage"] != "frozen"]
    phases = {"start-up": at("Run directory"), "data": at("Training ") - at("Run directory"),
              "features+finder": at("Learning-rate finder") - at("Training "), "head": frozen,
              "unfrozen_epochs": unfrozen,
              "finish": at("Report:") - at("Learning-rate finder") - frozen - sum(unfrozen),
              "exit": wall - at("Report:")}
    return {"wall_s": wall, "process_s": wall, "final_acc": metrics["valid_accuracy"],
            "best_acc": max(accs), "epochs_run": len(accs), "plan": metrics.get("plan"),
            "phases": phases, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime,
            "train_gflops": (training_gflops(metrics, sum(unfrozen), *trained)
                             if (trained := _trained(run_dir, metrics)) else None)}


def _trained(run_dir: Path, metrics: dict) -> tuple[int, bool] | None:
    """(images an unfrozen epoch trained on, whether the early layers were held) of a run.

    An epoch drops the ragged last batch (fridgeObjects: 64 of 86 images) and a time budget's
    epochs may run fewer batches (metrics.json's plan says how many). None where a budget's
    re-plans changed the epochs' lengths: the plan keeps only the last one.
    """
    from imgclf.config import TrainConfig
    from imgclf.data.datasets import train_steps

    cfg = TrainConfig.from_yaml(run_dir / "config.yaml", run=True)
    plan = metrics.get("plan") or {}
    if plan.get("replans"):
        return None
    batches = plan.get("batches") or train_steps(int(metrics["train_images"]), int(cfg.batch_size))
    return int(batches) * int(cfg.batch_size), bool(cfg.pretrained and cfg.freeze_early)


def training_gflops(metrics: dict, unfrozen_s: float, epoch_images: int,
                    freeze_early: bool = True) -> dict:
    """Achieved training GFLOP/s of the unfrozen epochs against this machine's fp32 matmul peak.

    A step costs, per convolution and linear layer, its forward FLOPs, the same again for the
    gradient of its input when that input requires one, and again for its weight's gradient
    when the weight trains; the layers the run held (`--freeze-early`) compute neither, and
    nothing computes the image's gradient. Counted from each layer's output shape in a hook,
    not by torch's FlopCounterMode, which counts a depthwise convolution's backward as if it
    were dense (32x too much on a 32-channel layer, torch 2.14).
    """
    import timm
    import torch

    from imgclf.training.models import early_layer_params

    size = 224
    net = timm.create_model(ARCH, num_classes=len(metrics["classes"])).train()
    if freeze_early:
        for p in early_layer_params(net):
            p.requires_grad = False
    totals = {"forward": 0.0, "step": 0.0}

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops = 2.0 * output.numel() * k
        else:
            flops = 2.0 * output.numel() * module.in_features
        totals["forward"] += flops
        totals["step"] += flops * (1 + inputs[0].requires_grad + module.weight.requires_grad)

    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    net(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    forward, step = totals["forward"], totals["step"]
    images = epoch_images * metrics["epochs"]
    achieved = step * images / max(unfrozen_s, 1e-9) / 1e9
    a = torch.randn(2048, 2048)
    a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    peak = 10 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
    return {"forward_gflop_per_image": forward / 1e9, "step_gflop_per_image": step / 1e9,
            "achieved_gflops": achieved, "matmul_peak_gflops": peak,
            "share_of_peak": achieved / peak}


def run_fastai(data: Path, epochs: int, out: Path, extra: list[str]) -> dict:
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


def run_plain(data: Path, epochs: int, out: Path, extra: list[str]) -> dict:
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


WORKERS = {"fastai": run_fastai, "plain": run_plain}  # python workers; imgclf is its command


def worker(name: str, data: str, epochs: int, out: str, extra: list[str]) -> None:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    result = WORKERS[name](DATA[data], epochs, Path(out), extra)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
    print("RESULT " + json.dumps(result), flush=True)


def warm_memory(gb: float) -> float:
    """Touch `gb` GB once in a throwaway process; returns the seconds it took.

    On this project's virtual machines the first use of each page of memory after boot costs
    about 3 s of kernel time per GB (measured: 6 GB took 17.7 s the first time, 1.4 s in the
    next process). Without this, that one-off cost falls on whichever tool runs first.
    """
    code = (f"import numpy as np; a = np.ones(int({gb} * 2**30) // 8); a[::512] += 1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fastai-epochs", type=int, default=3, help="fastai's fine_tune(N)")
    ap.add_argument("--imgclf-args", default="", help="extra imgclf train flags (default: none)")
    ap.add_argument("--only", nargs="*", choices=sorted(DATA))
    ap.add_argument("--with-plain", action="store_true", help="also the plain PyTorch loop")
    ap.add_argument("--skip", nargs="*", default=[], choices=["imgclf", *sorted(WORKERS)])
    ap.add_argument("--warm-memory-gb", type=float, default=10.0,
                    help="memory touched once before the first run (0: none); see warm_memory")
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--data", choices=sorted(DATA))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", tempfile.mkdtemp(prefix="imgclf-peers-cache-"))
    if args.worker:
        worker(args.worker, args.data, args.epochs, args.out, extra)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="imgclf-peers-"))
    # A user's second run finds the modules compiled; a fresh checkout's first run compiles
    # imgclf's sources (about 3 s here), which would land on whichever data set runs first.
    import importlib.util

    for package in ("imgclf", "fastai"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            subprocess.run([sys.executable, "-m", "compileall", "-q",
                            str(Path(spec.origin).parent)], check=False)
    if args.warm_memory_gb > 0:
        print(f"warmed {args.warm_memory_gb:.0f} GB of memory in "
              f"{warm_memory(args.warm_memory_gb):.1f} s", flush=True)
    tools = [t for t in ("imgclf", "fastai", "plain") if t not in args.skip
             and (t != "plain" or args.with_plain)]
    results: dict[tuple[str, str], dict] = {}
    for data in DATA:
        if args.only and data not in args.only:
            continue
        for name in tools:
            if name == "imgclf":
                r = run_imgclf(DATA[data], out / f"imgclf-{data}", args.imgclf_args.split())
            else:
                cmd = [sys.executable, __file__, "--worker", name, "--data", data, "--epochs",
                       str(args.fastai_epochs), "--out", str(out / f"{name}-{data}")]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                process_wall = time.perf_counter() - t0
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{name} on {data} failed:\n{proc.stderr[-3000:]}")
                    continue
                r = json.loads(line[-1][7:])
                r["process_s"] = process_wall
            results[(name, data)] = r
            print(f"{name:7} {data:10} done: {r}", flush=True)
    print(f"\nfastai fine_tune({args.fastai_epochs}); imgclf defaults {args.imgclf_args or ''}; "
          f"model {ARCH}; cores {len(os.sched_getaffinity(0))}")
    print(f"{'data':10} {'tool':7} {'process_s':>9} {'in_call_s':>9} {'final_acc':>9} "
          f"{'best_acc':>8} {'peak_MB':>8} {'epochs':>6}")
    for data in DATA:
        for name in tools:
            r = results.get((name, data))
            if r:
                print(f"{data:10} {name:7} {r['process_s']:9.1f} {r['wall_s']:9.1f} "
                      f"{r['final_acc']:9.4f} {r['best_acc']:8.4f} {r['peak_rss_mb']:8.0f} "
                      f"{r['epochs_run']:6d}")
        for name in tools:
            r = results.get((name, data))
            if r:
                print(f"{'':10} {name:7} CPU user {r['cpu_user_s']:.0f} s, kernel "
                      f"{r['cpu_sys_s']:.0f} s ({r['cpu_sys_s'] / max(1e-9, r['cpu_user_s'] + r['cpu_sys_s']):.0%})")
        base, peer = results.get(("imgclf", data)), results.get(("fastai", data))
        if base:
            ph = base["phases"]
            print(f"{'':10} imgclf phases (s): start-up {ph['start-up']:.1f}, "
                  f"data {ph['data']:.1f}, features+LR finder {ph['features+finder']:.1f}, "
                  f"head {ph['head']:.1f}, unfrozen epochs "
                  f"{' '.join(f'{x:.1f}' for x in ph['unfrozen_epochs'])}, "
                  f"then predictions, report, bundle {ph['finish']:.1f}, exit {ph['exit']:.1f}; "
                  f"plan {base['plan']}")
            g = base["train_gflops"]
            if g is None:
                print(f"{'':10} imgclf training: GFLOP/s not counted (re-planned epochs)")
            else:
                print(f"{'':10} imgclf training: {g['achieved_gflops']:.1f} GFLOP/s "
                      f"({g['step_gflop_per_image']:.2f} GFLOP per image a step, forward "
                      f"{g['forward_gflop_per_image']:.2f}), {g['share_of_peak']:.0%} of the "
                      f"fp32 matmul peak {g['matmul_peak_gflops']:.0f}")
        if base and peer:
            ratio = base["process_s"] / peer["process_s"]
            verdict = "ok" if ratio <= 0.25 and base["final_acc"] >= peer["final_acc"] else "MISS"
            print(f"{data:10} imgclf/fastai: wall {ratio:.2f}x (bar 0.25), final accuracy "
                  f"{base['final_acc']:.4f} vs {peer['final_acc']:.4f}  {verdict}")


if __name__ == "__main__":
    main()
