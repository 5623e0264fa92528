"""Does unfreezing make the model worse? Cause and per-epoch effect (issue 21).

    .venv/bin/python benchmarks/finetune_stability.py --data magnetic [--diagnose]
        [--variant "batchnorm=train,resize=crop" --variant default ...]

Two parts, each optional:

* `--diagnose` measures the mechanism on one data set, without training the body: pooled
  features of the same images with BatchNorm in eval mode (ImageNet running statistics, what
  the frozen stage caches), in train mode (statistics of each batch of training images, what
  the first unfrozen steps compute), and in eval mode after re-estimating the statistics on
  the training images. It prints their relative drift and the accuracy of a head trained on
  one kind of feature and applied to another, for centre crops and for squished images.
* each `--variant` trains with defaults plus the named options (tf_efficientnet_lite0, local
  weights) and prints validation accuracy per epoch: epoch 0 is the frozen stage.

Variants name TrainConfig options as key=value pairs joined by commas; "default" adds none.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
DATA = SHARED / "data"
SETS = {
    "magnetic": {"data": DATA / "magnetic_tiles"},
    "fridge": {"data": DATA / "fridgeObjects"},
    "caltech": {"data": DATA / "caltech101_subset"},
    "imagenette": {"data": DATA / "imagenette2_224_subset"},
    "multilabel": {"data": DATA / "multilabelFridgeObjects" / "images",
                   "csv": DATA / "multilabelFridgeObjects" / "labels.csv"},
}


def parse_variant(text: str) -> dict:
    if text == "default":
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = yaml.safe_load(value.strip())
    return out


def run_variant(name: str, options: dict, out: Path) -> dict:
    from imgclf import api

    spec = SETS[name]
    kw = {"csv": str(spec["csv"])} if "csv" in spec else {}
    t0 = time.perf_counter()
    run = api.train(spec["data"], model="tf_efficientnet_lite0", weights=str(WEIGHTS),
                    out=str(out), **kw, **options)
    wall = time.perf_counter() - t0
    m = run.metrics()
    monitor = "zero_one_accuracy" if m["task"] == "multi_label" else "accuracy"
    rows = run.history() if hasattr(run, "history") else None
    if rows is None:
        import csv

        with open(run.path / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    per_epoch = [float(r[f"valid_{monitor}"]) for r in rows]
    return {"epochs": per_epoch, "kept": m.get(f"valid_{monitor}"), "best_epoch": m["best_epoch"],
            "wall": wall, "monitor": monitor, "fine_tuning": m.get("fine_tuning")}


def diagnose(name: str) -> None:
    """Feature drift between BatchNorm modes, and what it does to a head trained on one."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from imgclf.commands import train as train_cmd
    from imgclf.data.sources import load_table
    from imgclf.training import models
    from imgclf.config import TrainConfig
    from imgclf.data.datasets import make_loader
    from imgclf.data.transforms import Preprocess, normalize

    spec = SETS[name]
    torch.manual_seed(0)
    results = []
    for resize in ("crop", "squish"):
        cfg = TrainConfig(data=str(spec["data"]), csv=str(spec["csv"]) if "csv" in spec else None,
                          weights=str(WEIGHTS), resize=resize)
        table = load_table(cfg)
        model = models.create_model(cfg.model, len(table.classes), weights=cfg.weights)
        pre = Preprocess.from_model_cfg(model.pretrained_cfg, resize=resize)
        prep = train_cmd.prepare_data(cfg, pre, table=table)
        data = train_cmd._datasets(prep, pre)
        if prep.task.multi_label:
            print("diagnose: single-label data only")
            return

        def features(net, ds, bn_train: bool, train_loader: bool):
            loader = make_loader(ds, 32, train=train_loader, workers=0, seed=0)
            net.eval()
            if bn_train:
                for m in net.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.train()
            fs, ys = [], []
            with torch.no_grad():
                for x, y in loader:
                    fs.append(models.pre_logits(net, normalize(x, pre.mean, pre.std)))
                    ys.append(y)
            return torch.cat(fs).numpy(), torch.cat(ys).numpy()

        torch.manual_seed(0)
        # The training images under the same seeded augmented order for every mode.
        f_tr, y_tr = features(model, data.train, False, False)
        f_va, y_va = features(model, data.valid, False, False)
        batch_model = copy.deepcopy(model)
        f_tr_b, _ = features(batch_model, data.train, True, False)
        f_va_b, _ = features(copy.deepcopy(model), data.valid, True, False)
        adapted = copy.deepcopy(model)
        loader = make_loader(data.train, 32, train=True, workers=0, seed=1)
        torch.optim.swa_utils.update_bn(
            (normalize(x, pre.mean, pre.std) for x, _ in loader), adapted)
        f_tr_a, _ = features(adapted, data.train, False, False)
        f_va_a, _ = features(adapted, data.valid, False, False)
        f_va_ab, _ = features(copy.deepcopy(adapted), data.valid, True, False)

        def drift(a, b):
            return float(np.mean(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)))

        def head(f, y):
            return LogisticRegression(max_iter=2000, C=1.0).fit(f, y)

        h_eval, h_adapt = head(f_tr, y_tr), head(f_tr_a, y_tr)
        h_batch = head(f_tr_b, y_tr)
        results.append((resize, [
            ("drift eval(ImageNet stats) -> train-mode batches", drift(f_va, f_va_b)),
            ("drift eval(adapted stats) -> train-mode batches", drift(f_va_a, f_va_ab)),
            ("head on ImageNet-stat features, valid eval", h_eval.score(f_va, y_va)),
            ("same head, valid features in train-mode BN", h_eval.score(f_va_b, y_va)),
            ("head on batch-stat features, valid train-mode", h_batch.score(f_va_b, y_va)),
            ("head on adapted-stat features, valid adapted", h_adapt.score(f_va_a, y_va)),
            ("same head, valid in train-mode BN", h_adapt.score(f_va_ab, y_va)),
        ]))
    print(f"\n{name}: BatchNorm diagnosis (tf_efficientnet_lite0, logistic-regression heads)")
    for resize, items in results:
        print(f"  presize {resize}:")
        for label, value in items:
            print(f"    {label:50s} {value:7.3f}")


def head_steps(name: str, steps=(60, 200, 500, 1000)) -> None:
    """Accuracy of the frozen stage's head after N steps on the same cached features."""
    import torch
    from torch.utils.data import TensorDataset

    from imgclf.commands import train as train_cmd
    from imgclf.config import TrainConfig
    from imgclf.data.datasets import make_loader
    from imgclf.data.sources import load_table
    from imgclf.data.transforms import Preprocess
    from imgclf.training import fine_tune, models
    from imgclf.training.epochs import Best
    from imgclf.training.frozen_head import ViewSampler, head_passes, lr_range_test, train_head

    spec = SETS[name]
    cfg = TrainConfig(data=str(spec["data"]), csv=str(spec["csv"]) if "csv" in spec else None,
                      weights=str(WEIGHTS))
    table = load_table(cfg)
    model = models.create_model(cfg.model, len(table.classes), weights=cfg.weights)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg, resize=cfg.resize)
    prep = train_cmd.prepare_data(cfg, pre, table=table)
    data = train_cmd._datasets(prep, pre)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ft, yt = fine_tune.extract_features(model, make_loader(data.train, 32, train=False, workers=0),
                                        pre, "32-true", cpu)
    fv, yv = fine_tune.extract_features(model, make_loader(data.valid, 32, train=False, workers=0),
                                        pre, "32-true", cpu)
    head, task = models.classifier(model), prep.task
    lr, _, _ = lr_range_test(head, task, ft, yt, 32, 0)
    print(f"\n{name}: frozen-stage head after N steps on one cached view (lr {lr:.2e})")
    for n_steps in steps:
        torch.manual_seed(0)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        rows: list = []
        train_head(head, task, TensorDataset(ft, yt), (fv, yv), 1, lr,
                   ViewSampler(len(ft), 1, 0, head_passes(len(ft), 32, n_steps)), 32, rows,
                   Best(), model, lambda r, i: None)
        print(f"  {n_steps:5d} steps: valid {task.monitor[6:]} "
              f"{rows[-1].metrics[task.monitor]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", choices=sorted(SETS), default=["magnetic"])
    ap.add_argument("--variant", action="append", default=[],
                    help='TrainConfig options "k=v,k=v" or "default"; repeatable')
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--head-steps", action="store_true",
                    help="the frozen head's accuracy against its number of steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "imgclf-cache"))
    if not WEIGHTS.is_file():
        raise SystemExit(f"{WEIGHTS} missing")
    out = Path(args.out or tempfile.mkdtemp(prefix="imgclf-ft-"))
    for name in args.data:
        if not SETS[name]["data"].is_dir():
            print(f"skip {name}: {SETS[name]['data']} missing")
            continue
        if args.diagnose:
            diagnose(name)
        if args.head_steps:
            head_steps(name)
        table = []
        for v in args.variant:
            table.append((v, run_variant(name, parse_variant(v), out)))
        if table:
            monitor = table[0][1]["monitor"]
            print(f"\n{name}: validation {monitor} per epoch (epoch 0 = frozen stage)")
            print(f"  {'variant':40s} {'frozen':>6}  unfrozen epochs{'':16s} {'kept':>6} "
                  f"{'best':>4} {'wall_s':>6}")
            for v, r in table:
                eps = r["epochs"]
                print(f"  {v:40s} {eps[0]:6.3f}  " + " ".join(f"{e:.3f}" for e in eps[1:])
                      + f"  {r['kept']:6.3f} {r['best_epoch']:4d} {r['wall']:6.1f}")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
