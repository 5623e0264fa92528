"""From-scratch techniques on Imagenette (issue 6): what each one buys, alone and combined.

Trains a randomly initialised model on ../shared/data/imagenette2_224_subset (train/ 1,000
images, val/ 1,000, 10 classes) with the same budget of epochs for every configuration but the
last, which has the baseline's budget of wall time instead:

    baseline     ImageNet mean/std, one size, plain cross-entropy, no TTA
    norm         --norm-stats auto (mean/std computed from the training images)
    progressive  --sizes (e.g. 64,96,128): small stages first, the last at the final size
    mixup        --mixup 0.2
    cutmix       --cutmix 1.0 (only with --only ...,cutmix: mixup is the default mix row)
    smoothing    --label-smoothing 0.1
    tta          the baseline's own model, evaluated with --tta 3 (flip, zoom, zoom + flip)
    combined     norm + progressive + mixup (off for the last two epochs) + smoothing + TTA,
                 same epochs as the baseline
    combined-same-wall
                 the same recipe, with the time progressive resizing saves spent on more
                 small-size epochs (--combined-stage-epochs, default 8,6,4: 18 epochs), as
                 fastai's progressive resizing does; its wall time must stay <= the baseline's

and prints validation accuracy (the saved model's; with TTA where it is on) and the final
epoch's plain accuracy, with wall time per configuration (training, validation and the run's
final evaluation; the decode cache is warmed first so no configuration pays for decoding).
Then, with --pretrained-check, the pretrained route: tf_efficientnet_lite0 from the local
weights, default recipe.

    python benchmarks/from_scratch.py                  # every configuration
    python benchmarks/from_scratch.py --only baseline,combined
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared"


def configs(args) -> dict[str, dict]:
    sizes = [int(s) for s in args.sizes.split(",")]
    stage_epochs = [int(e) for e in args.combined_stage_epochs.split(",")]
    base = dict(model=args.model, pretrained=False, size=sizes[-1], epochs=args.epochs,
                batch_size=args.batch_size, seed=args.seed, norm_stats="imagenet", lr=args.lr)
    last = args.epochs  # no frozen stage from scratch: epochs are numbered 0 .. epochs - 1
    return {
        "baseline": base,
        "norm": {**base, "norm_stats": "auto"},
        "progressive": {**base, "sizes": sizes, "size": None},
        "mixup": {**base, "mixup": 0.2},
        "cutmix": {**base, "cutmix": 1.0},
        "smoothing": {**base, "label_smoothing": 0.1},
        "tta": "baseline",
        "combined": {**base, "norm_stats": "auto", "sizes": sizes, "size": None,
                     "mixup": 0.2, "mixup_off_epoch": last - 2, "label_smoothing": 0.1,
                     "tta": args.tta},
        "combined-same-wall": {**base, "norm_stats": "auto", "sizes": sizes, "size": None,
                               "stage_epochs": stage_epochs, "epochs": sum(stage_epochs),
                               "mixup": 0.2, "mixup_off_epoch": sum(stage_epochs) - 2,
                               "label_smoothing": 0.1, "tta": args.tta},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenette2_224_subset"))
    ap.add_argument("--model", default="resnet18d")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--sizes", default="64,96,128",
                    help="Progressive sizes; the last is every configuration's final size.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", default="auto")
    ap.add_argument("--tta", type=int, default=3)
    ap.add_argument("--combined-stage-epochs", default="8,6,4",
                    help="Epochs per --sizes stage of the combined-same-wall configuration.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="Comma-separated configurations to run.")
    ap.add_argument("--work", default="/tmp/imgclf-bench-scratch")
    ap.add_argument("--pretrained-check", action="store_true",
                    help="Also train tf_efficientnet_lite0 from ../shared/weights.")
    ap.add_argument("--weights",
                    default=str(SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} not found")
    if args.lr != "auto":
        args.lr = float(args.lr)
    os.environ.setdefault("IMGCLF_CACHE_DIR", "/tmp/imgclf-cache")

    import torch
    from rich.console import Console

    from imgclf import api
    from imgclf.data.cache import decode_all, default_cache_dir
    from imgclf.data.transforms import Preprocess, presize_for
    from imgclf.deploy.predict import expand_paths

    def console():
        return Console(stderr=True) if args.verbose else Console(file=io.StringIO())

    work = Path(args.work)
    runs = work / "runs"
    all_configs = configs(args)
    chosen = args.only.split(",") if args.only else [c for c in all_configs if c != "cutmix"]
    final = int(args.sizes.split(",")[-1])
    pre = Preprocess(size=final, presize=presize_for(final))
    files = expand_paths([args.data])
    t = time.perf_counter()
    decode_all(files, pre, default_cache_dir())
    print(f"decode cache warm: {len(files)} images in {time.perf_counter() - t:.1f}s "
          f"(presize {pre.presize})", flush=True)
    print(f"{args.model} from random init, {args.epochs} epochs, final size {final}, batch "
          f"{args.batch_size}, seed {args.seed}, torch threads {torch.get_num_threads()}",
          flush=True)
    results: dict[str, dict] = {}
    for name in chosen:
        cfg = all_configs[name]
        if cfg == "baseline":
            if "baseline" not in results:
                print("tta needs the baseline run; add it to --only", flush=True)
                continue
            t = time.perf_counter()
            r = api.evaluate(runs / "baseline", tta=args.tta, out=work / "tta-eval",
                             console=console())
            eval_s = time.perf_counter() - t
            results[name] = {"acc": r["tta"]["accuracy"], "last": results["baseline"]["last"],
                             "wall": results["baseline"]["wall"] + eval_s,
                             "note": f"baseline model, {args.tta + 1} views; +{eval_s:.0f}s eval"}
        else:
            shutil.rmtree(runs / name, ignore_errors=True)
            t = time.perf_counter()
            run = api.train(args.data, out=str(runs), name=name, console=console(), **cfg)
            wall = time.perf_counter() - t
            m = run.metrics()
            last = run.history()[-1]["valid_accuracy"]
            note = f"best epoch {m['best_epoch']} ({m['best_stage']})"
            if m.get("valid_without_tta"):
                note += f"; without TTA {m['valid_without_tta']['accuracy']:.3f}"
            results[name] = {"acc": m["valid_accuracy"], "last": float(last), "wall": wall,
                             "note": note}
        r = results[name]
        print(f"  {name:18s} acc={r['acc']:.3f} last_epoch={r['last']:.3f} "
              f"wall={r['wall']:.0f}s  {r['note']}", flush=True)

    print()
    print(f"{'config':18s} {'val acc':>8s} {'last ep':>8s} {'wall s':>7s} {'vs base':>8s}")
    base = results.get("baseline")
    for name, r in results.items():
        delta = f"{100 * (r['acc'] - base['acc']):+.1f}pt" if base else ""
        print(f"{name:18s} {r['acc']:8.3f} {r['last']:8.3f} {r['wall']:7.0f} {delta:>8s}")
    for name in ("combined", "combined-same-wall"):
        if base and name in results:
            c = results[name]
            gain, ratio = 100 * (c["acc"] - base["acc"]), c["wall"] / base["wall"]
            ok = gain >= 5 and ratio <= 1.0
            print(f"{name} vs baseline: {gain:+.1f} points at {ratio:.2f}x the wall time -> "
                  f"{'PASS' if ok else 'FAIL'} (target: >= +5 points at <= 1.00x)")
    (work / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    if args.pretrained_check:
        shutil.rmtree(runs / "pretrained-lite0", ignore_errors=True)
        t = time.perf_counter()
        run = api.train(args.data, out=str(runs), name="pretrained-lite0", console=console(),
                        model="tf_efficientnet_lite0", weights=args.weights, seed=args.seed)
        m = run.metrics()
        print(f"\npretrained tf_efficientnet_lite0 (local weights, default recipe): "
              f"valid_accuracy={m['valid_accuracy']:.4f} wall={time.perf_counter() - t:.0f}s "
              f"-> {'PASS' if m['valid_accuracy'] >= 0.97 else 'FAIL'} (target >= 0.97)")


if __name__ == "__main__":
    main()
