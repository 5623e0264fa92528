"""Label cleaning end to end on Imagenette (issue 20): flip, find, review, retrain.

1. 5% of the training labels of imagenette2_224_subset are flipped to another class at random
   (seeded); the validation set is the untouched val/ folder. The labels are CSV files under
   --work (the images are read where they are, never copied).
2. `imgclf cv` runs on the noisy training images alone; `imgclf review`'s ranking of the
   out-of-fold predictions (ReviewSession.queue("label_issues")) suggests a class for each
   suspect, and the top suggestions are accepted through the API the page calls
   (ReviewSession.decide), which writes <cv>/corrections.csv.
   --accept N accepts the top N (default: as many as there are flipped labels); with --oracle
   the simulated reviewer accepts a suggestion only when it is the true class and keeps the
   label otherwise, as a person looking at the image would.
3. Three runs on the same split: clean labels, noisy labels, noisy labels + `--corrections`.
   Prints their validation accuracy.

    IMGCLF_CACHE_DIR=/tmp/imgclf-cache python benchmarks/label_cleaning.py --folds 3 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared"
DATA = SHARED / "data" / "imagenette2_224_subset"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def write_labels(work: Path, seed: int, fraction: float) -> tuple[dict, dict]:
    """clean.csv, noisy.csv (train + valid) and noisy_train.csv (the training rows only).

    Returns:
        {absolute path: true label} of the flipped images, and {absolute path: noisy label}.
    """
    classes = sorted(p.name for p in (DATA / "train").iterdir() if p.is_dir())
    train = [(f"train/{c}/{f.name}", c) for c in classes
             for f in sorted((DATA / "train" / c).iterdir())]
    valid = [(f"val/{c}/{f.name}", c) for c in classes for f in sorted((DATA / "val" / c).iterdir())]
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(train)), round(fraction * len(train))))
    noisy = [(name, rng.choice([x for x in classes if x != c]) if i in flip else c)
             for i, (name, c) in enumerate(train)]
    work.mkdir(parents=True, exist_ok=True)

    def write(path: Path, rows, split: str | None) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "split"] if split else ["image", "label"])
            for name, label, *rest in rows:
                w.writerow([name, label, *rest])

    write(work / "clean.csv", [(n, c, "train") for n, c in train] +
          [(n, c, "valid") for n, c in valid], "split")
    write(work / "noisy.csv", [(n, c, "train") for n, c in noisy] +
          [(n, c, "valid") for n, c in valid], "split")
    write(work / "noisy_train.csv", noisy, None)
    root = DATA.absolute()
    flipped = {str(root / train[i][0]): train[i][1] for i in sorted(flip)}
    return flipped, {str(root / n): c for n, c in noisy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgclf-label-cleaning"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5, help="whole-network epochs of each run")
    ap.add_argument("--freeze-epochs", type=int, default=1)
    ap.add_argument("--cv-epochs", type=int, default=None, help="epochs of the folds (default: --epochs)")
    ap.add_argument("--fraction", type=float, default=0.05, help="training labels flipped")
    ap.add_argument("--accept", type=int, default=None,
                    help="suggestions accepted (default: as many as the flipped labels)")
    ap.add_argument("--oracle", action="store_true",
                    help="accept only suggestions that are the true class, keep the rest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from imgclf import api
    from imgclf.commands.review import ReviewSession

    t0 = time.time()
    flipped, noisy_labels = write_labels(args.work, args.seed, args.fraction)
    common = dict(model=args.model, weights=str(args.weights), freeze_epochs=args.freeze_epochs,
                  seed=args.seed, out=str(args.work / "runs"))
    stamp = time.strftime("%Y%m%d-%H%M%S")

    cv = api.cross_validate(DATA, folds=args.folds, csv=str(args.work / "noisy_train.csv"),
                            epochs=args.cv_epochs if args.cv_epochs is not None else args.epochs,
                            name=f"cv-noisy-{stamp}", **common)
    session = ReviewSession(cv.path)
    issues = session.queue("label_issues")
    k = args.accept if args.accept is not None else len(flipped)
    accepted, kept = [], []
    for item in issues[:k]:
        truth = flipped.get(item["path"], noisy_labels[item["path"]])
        if args.oracle and item["suggested"] != truth:
            session.decide(item["path"], "keep")
            kept.append(item)
        else:
            session.decide(item["path"], "relabel", [item["suggested"]])
            accepted.append(item)
    found = [x for x in issues[:k] if x["path"] in flipped]
    right = [x for x in accepted if flipped.get(x["path"], noisy_labels[x["path"]]) == x["suggested"]]
    broke = [x for x in accepted if x["path"] not in flipped]
    t_cv = time.time() - t0

    runs = {}
    for name, labels, extra in (("clean", "clean.csv", {}), ("noisy", "noisy.csv", {}),
                                ("corrected", "noisy.csv",
                                 {"corrections": str(session.corrections_path)})):
        t = time.time()
        run = api.train(DATA, csv=str(args.work / labels), epochs=args.epochs,
                        name=f"{name}-{stamp}", **common, **extra)
        m = json.loads((run.path / "metrics.json").read_text())
        runs[name] = {"accuracy": m["valid_accuracy"], "seconds": time.time() - t,
                      "path": str(run.path)}

    n_train = len(noisy_labels)
    print(f"imagenette2_224_subset: {n_train} training images, {len(flipped)} labels flipped "
          f"({args.fraction:.0%}, seed {args.seed}); validation: the 1000 clean val/ images")
    print(f"model {args.model}, {args.freeze_epochs} frozen + {args.epochs} epochs per run; cv: "
          f"{args.folds} folds x {args.cv_epochs if args.cv_epochs is not None else args.epochs} "
          f"epochs ({t_cv:.0f} s with the review)")
    print(f"review ranking: {len(issues)} suspects; top {k}: {len(found)} of the {len(flipped)} "
          f"flipped labels (precision {len(found) / max(k, 1):.3f}, recall "
          f"{len(found) / max(len(flipped), 1):.3f})")
    print(f"accepted {len(accepted)} suggestions{' (oracle: kept ' + str(len(kept)) + ')' if args.oracle else ''}: "
          f"{len(right)} restore the true label, {len(broke)} relabel a correct image")
    print(f"corrections: {session.corrections_path}")
    print(f"{'labels':<10} {'valid accuracy':>15} {'seconds':>8}  run")
    for name, r in runs.items():
        print(f"{name:<10} {r['accuracy']:>15.4f} {r['seconds']:>8.0f}  {r['path']}")
    gap = (runs["clean"]["accuracy"] - runs["corrected"]["accuracy"]) * 100
    print(f"corrected vs clean: {-gap:+.1f} points; noisy vs clean: "
          f"{(runs['noisy']['accuracy'] - runs['clean']['accuracy']) * 100:+.1f} points; "
          f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
