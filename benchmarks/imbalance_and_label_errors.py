"""Imbalance handling and label-error detection on Imagenette (issue 10).

1. Imbalance: an imbalanced copy of imagenette2_224_subset keeps 100 training images for five
   classes and 10 for the other five (seeded choice of images; the first five classes in sorted
   order keep 100); the validation set is the untouched val/ folder (100 per class). One run per
   --balance mode; prints balanced accuracy (and accuracy, macro F1) on val.
2. Label errors: 5% of the imbalanced copy's training labels are flipped to another class at
   random (seeded), `imgclf cv` runs on those training images alone, and `imgclf label-issues`
   ranks the out-of-fold predictions; prints precision and recall among the top-ranked 5%.

The copies are folders of symbolic links under --work (the images are never copied into the
repository); the decode cache is shared with every other run (IMGCLF_CACHE_DIR).

    IMGCLF_CACHE_DIR=/tmp/imgclf-cache python benchmarks/imbalance_and_label_errors.py \\
        --part all --modes none,weights,sampler
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared"


def make_imbalanced(src: Path, dst: Path, seed: int, many: int = 100, few: int = 10) -> dict:
    """Symlink copy: train/ keeps `many` images of the first half of the classes, `few` of the rest."""
    if dst.exists():
        shutil.rmtree(dst)
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    rng = random.Random(seed)
    counts = {}
    for i, c in enumerate(classes):
        files = sorted((src / "train" / c).iterdir())
        keep = files if i < len(classes) // 2 else rng.sample(files, few)
        keep = sorted(keep)[:many]
        (dst / "train" / c).mkdir(parents=True)
        for f in keep:
            (dst / "train" / c / f.name).symlink_to(f.resolve())
        counts[c] = len(keep)
        (dst / "val" / c).mkdir(parents=True)
        for f in sorted((src / "val" / c).iterdir()):
            (dst / "val" / c / f.name).symlink_to(f.resolve())
    return counts


def make_noisy(imbalanced: Path, dst: Path, seed: int, fraction: float) -> list[Path]:
    """Class folders of the imbalanced training images with `fraction` of labels flipped.

    Returns:
        The flipped files (as paths under `dst`, which is how the predictions name them).
    """
    if dst.exists():
        shutil.rmtree(dst)
    classes = sorted(p.name for p in (imbalanced / "train").iterdir())
    items = [(c, f) for c in classes for f in sorted((imbalanced / "train" / c).iterdir())]
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(items)), round(fraction * len(items))))
    flipped = []
    for i, (c, f) in enumerate(items):
        label = rng.choice([x for x in classes if x != c]) if i in flip else c
        out = dst / label / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.symlink_to(f.resolve())
        if i in flip:
            flipped.append(out.absolute())
    return flipped


def _console(verbose: bool) -> Console:
    return Console(stderr=True) if verbose else Console(file=io.StringIO())


def imbalance(args, work: Path) -> None:
    from imgclf import api

    data = work / "imagenette_imbalanced"
    counts = make_imbalanced(Path(args.data), data, args.seed)
    print(f"[imbalance] train images per class: {counts}; val: 100 per class (untouched)")
    print(f"[imbalance] recipe: {args.model}, freeze_epochs={args.freeze_epochs}, "
          f"epochs={args.epochs}, size={args.size or 'model default'}, batch_size={args.batch_size}")
    for mode in args.modes.split(","):
        shutil.rmtree(work / "runs" / f"imbalance-{mode}", ignore_errors=True)
        t = time.time()
        run = api.train(data, weights=args.weights, model=args.model, epochs=args.epochs,
                        freeze_epochs=args.freeze_epochs, size=args.size, balance=mode,
                        batch_size=args.batch_size, seed=args.seed, out=str(work / "runs"),
                        name=f"imbalance-{mode}", console=_console(args.verbose))
        m = run.metrics()
        print(f"[imbalance] --balance {mode:8s} balanced_accuracy={m['valid_balanced_accuracy']:.4f} "
              f"accuracy={m['valid_accuracy']:.4f} f1_macro={m['valid_f1_macro']:.4f} "
              f"best_epoch={m['best_epoch']} ({m['best_stage']}) wall={time.time() - t:.0f}s",
              flush=True)
        # The best epoch is picked on val itself, so the last epoch is the unbiased number.
        last = run.history()[-1]
        print(f"[imbalance]          last epoch: balanced_accuracy="
              f"{last['valid_balanced_accuracy']:.4f} f1_macro={last['valid_f1_macro']:.4f}")
        few = [c for c, n in counts.items() if n < 100]
        pc = m["valid_per_class"]
        print("[imbalance]          recall of the 10-image classes: "
              + " ".join(f"{pc[c]['recall']:.2f}" for c in few), flush=True)


def label_errors(args, work: Path) -> None:
    from imgclf.commands.cv import cross_validate
    from imgclf.commands.label_issues import find_label_issues

    imbalanced = work / "imagenette_imbalanced"
    if not imbalanced.is_dir():
        make_imbalanced(Path(args.data), imbalanced, args.seed)
    data = work / "imagenette_noisy"
    flipped = set(make_noisy(imbalanced, data, args.seed, args.flip))
    n = sum(1 for _ in data.rglob("*.JPEG"))
    print(f"[label-errors] {len(flipped)} of {n} training labels flipped (seed {args.seed})")
    print(f"[label-errors] cv: {args.folds} folds, {args.model}, freeze_epochs="
          f"{args.cv_freeze_epochs}, epochs={args.cv_epochs}, size={args.cv_size}")
    cv_dir = work / "runs" / "label-errors-cv"
    t = time.time()
    if args.reuse_cv and (cv_dir / "cv_config.yaml").is_file():
        # Same seed, same flips: finished folds are kept, the rest trained.
        result = cross_validate(resume=cv_dir, console=_console(args.verbose))
    else:
        shutil.rmtree(cv_dir, ignore_errors=True)
        result = cross_validate(data, folds=args.folds, weights=args.weights, model=args.model,
                                epochs=args.cv_epochs, freeze_epochs=args.cv_freeze_epochs,
                                size=args.cv_size, batch_size=args.batch_size, seed=args.seed,
                                out=str(work / "runs"), name=cv_dir.name,
                                console=_console(args.verbose))
    s = result.summary
    wall = "reused" if args.reuse_cv else f"{time.time() - t:.0f}s"
    print(f"[label-errors] cv wall={wall}; mean ± std over folds: " + ", ".join(
        f"{k}={s['mean'][k]:.4f}±{s['std'][k]:.4f}"
        for k in ("accuracy", "balanced_accuracy", "f1_macro")))
    issues = find_label_issues(result.path)
    top = issues.top(args.flip)
    hits = sum(Path(r["path"]) in flipped for r in top)
    precision = hits / len(top) if top else 0.0
    recall = hits / len(flipped)
    print(f"[label-errors] {len(issues.rows)} suspects in total; top {len(top)} "
          f"(= {args.flip:.0%} of {issues.n_images}): {hits} truly flipped -> "
          f"precision={precision:.3f} recall={recall:.3f}")
    missed = sorted(flipped - {Path(r["path"]) for r in top})
    for p in missed:
        rank = next((r["rank"] for r in issues.rows if Path(r["path"]) == p), None)
        print(f"[label-errors]   missed: {p.parent.name}/{p.name} (rank {rank})")
    print(json.dumps({"precision": precision, "recall": recall, "top": len(top),
                      "flipped": len(flipped), "images": issues.n_images}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["imbalance", "label-errors", "all"], default="all")
    ap.add_argument("--data", default=str(SHARED / "data" / "imagenette2_224_subset"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"))
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--work", default="/tmp/imgclf-bench-imbalance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="none,weights,sampler")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--freeze-epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cv-epochs", type=int, default=1)
    ap.add_argument("--cv-freeze-epochs", type=int, default=1)
    ap.add_argument("--cv-size", type=int, default=160)
    ap.add_argument("--reuse-cv", action="store_true",
                    help="Resume the label-error cross-validation in --work instead of redoing it.")
    ap.add_argument("--verbose", action="store_true", help="Show each run's own output.")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} not found")
    os.environ.setdefault("IMGCLF_CACHE_DIR", "/tmp/imgclf-cache")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part in ("imbalance", "all"):
        imbalance(args, work)
    if args.part in ("label-errors", "all"):
        label_errors(args, work)


if __name__ == "__main__":
    main()
