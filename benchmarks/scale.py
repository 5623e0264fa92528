"""What the passes before training cost as the data grows, cold and warm (issue 18).

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000] [--size 224] [--epoch]
                                         [--cache-max-gb GB]
                                         [--work DIR] [--variants folder,csv]

For each N it generates (once, kept in --work) N small real-looking JPEGs: random crops, flips
and recolourings of the images in ../shared/data, saved at 120-320 px, dealt into
max(10, min(1000, N // 100)) classes, with a labels.csv beside them for the CSV variant. Then,
for each variant, in a fresh process (so peak RSS is that run's): a cold run on an empty decode
cache and a warm rerun, timing each phase before the first training step as `imgclf train`
runs it (imgclf.commands.train.prepare_data):

    listing   the source: walking the class folders, or reading the CSV and finding its files
    decode    the one pass per file: read, digest, decode, checks, perceptual hash, presize,
              cache entry written (warm: the index and the entries read back instead)
    checks    duplicates, near-duplicate search and confirmation, classes
    summary   the data summary

with images/s/core, peak RSS, and the cache's bytes on disk (each variant's cache is deleted
after its warm run: at --size 224 a square takes 197 KB, so 100k images need ~20 GB free in
--work besides ~1.5 GB of JPEGs; pass a --cache-max-gb above that, or imgclf's default cap,
min(20 GB, 25% of the disk), may be the smaller: the timed run is
`--sizes 1000,10000,100000 --variants folder,csv --cache-max-gb 25`). Sets whose squares exceed
the memory budget (imgclf.data.cache.default_memory_budget: min(4 GiB, 25% of available
memory); 100k images at 224 px do) stream them from the cache: the "streamed" field. `--epoch` adds one training epoch (random-init
--epoch-model, from the warm cache) and its images/s. The table ends with the
growth exponent of each column fitted over N (time ~ N^k: 1 is linear).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
PHASES = ("listing", "decode", "checks", "summary")


def _sources() -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    found = sorted(p for p in SHARED.rglob("*") if p.suffix.lower() in exts)
    if not found:
        sys.exit(f"no images under {SHARED}: the generator crops and recolours them")
    return found


def _make(args: tuple[int, str, str, int]) -> None:
    """Write image k: a crop of a source photo, maybe flipped, recoloured, resized, re-encoded."""
    from PIL import Image

    k, src, dst, seed = args
    rng = np.random.default_rng(seed * 1_000_003 + k)
    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.5, 0.95)), int(h * rng.uniform(0.5, 0.95))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(120, 321))
    scale = side / max(img.size)
    img = img.resize((max(16, int(img.size[0] * scale)), max(16, int(img.size[1] * scale))),
                     Image.Resampling.BILINEAR)
    gains = rng.uniform(0.75, 1.25, 3)
    arr = np.clip(np.asarray(img, dtype=np.float32) * gains + rng.normal(0, 4, 1), 0, 255)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(dst, quality=int(rng.integers(80, 96)))


def generate(root: Path, n: int, workers: int) -> Path:
    """N JPEGs in class folders under root/images, and root/labels.csv (file,label)."""
    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        return root
    sources = _sources()
    classes = max(10, min(1000, n // 100))
    jobs, rows = [], []
    for k in range(n):
        c = f"class{k % classes:04d}"
        rel = f"{c}/img{k:07d}.jpg"
        jobs.append((k, str(sources[(k * 7919) % len(sources)]), str(root / "images" / rel), 0))
        rows.append((rel, c))
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make, jobs, chunksize=256))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *rows])
    then = time.time() - 3600  # as a data set's files are: written a while ago
    for _, _, dst, _ in jobs:
        os.utime(dst, (then, then))
    done.write_text(json.dumps({"n": n, "classes": classes}))
    print(f"generated {n} images in {classes} classes in {time.perf_counter() - t:.0f}s: {root}",
          flush=True)
    return root


def measure(root: Path, variant: str, cache: Path, size: int, epoch_model: str | None,
            cache_max_gb: float | None = None) -> dict:
    """The phases of prepare_data, timed one by one (run in its own process)."""
    from imgclf.commands.train import _cache_dir
    from imgclf.config import TrainConfig
    from imgclf.data import validate
    from imgclf.data.cache import cache_info, decode_all, default_memory_budget, gb_to_bytes
    from imgclf.data.sources import load_table
    from imgclf.data.summary import summarize
    from imgclf.data.transforms import Preprocess, presize_for
    from imgclf.errors import ImageError

    opts = {"data": str(root / "images"), "cache_dir": str(cache), "cache_max_gb": cache_max_gb}
    if variant == "csv":
        opts["csv"] = str(root / "labels.csv")
    cfg = TrainConfig(**opts)
    pre = Preprocess(size=size, presize=presize_for(size), resize=cfg.resize)
    out: dict = {}
    t = time.perf_counter()
    table = load_table(cfg)
    out["listing"] = time.perf_counter() - t
    t = time.perf_counter()
    decoded, errors, checks = decode_all([s.path for s in table.samples], pre, _cache_dir(cfg),
                                         max_bytes=gb_to_bytes(cfg.cache_max_gb))
    out["decode"] = time.perf_counter() - t

    def reuse(path):
        if path in errors:
            raise ImageError(path, errors[path])
        return checks.get(path)

    t = time.perf_counter()
    table, report = validate.check_table(table, fn=reuse, progress=False)
    out["checks"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = summarize(table, report)
    out["summary"] = time.perf_counter() - t
    out.update(images=len(table.samples), classes=len(table.classes),
               near_candidates=report.near_duplicate_candidates,
               near_duplicates=len(report.near_duplicates), streamed=decoded.array is None,
               cache_bytes=cache_info(cache).bytes, notes=len(summary.notes),
               memory_budget_gb=round(default_memory_budget() / 1e9, 2))
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if epoch_model:
        from imgclf import api

        del decoded
        run = api.train(cfg.data, csv=cfg.csv, cache_dir=str(cache), model=epoch_model,
                        cache_max_gb=cache_max_gb,
                        pretrained=False, size=size, epochs=1, freeze_epochs=0, lr=1e-3,
                        out=str(cache.parent / "runs"), name=f"{variant}-{len(table.samples)}")
        out["epoch_images_per_s"] = run.metrics()["images_per_second"]
    return out


def _child(root: Path, variant: str, cache: Path, size: int, epoch_model: str | None,
           cache_max_gb: float | None) -> dict:
    cmd = [sys.executable, __file__, "--_measure", str(root), "--_variant", variant,
           "--_cache", str(cache), "--size", str(size)]
    if cache_max_gb:
        cmd += ["--cache-max-gb", str(cache_max_gb)]
    if epoch_model:
        cmd += ["--_epoch-model", epoch_model]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _exponent(ns: list[int], values: list[float]) -> str:
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v > 0]
    if len(pts) < 2:
        return "n/a"
    x, y = zip(*pts)
    return f"{np.polyfit(x, y, 1)[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--variants", default="folder,csv")
    ap.add_argument("--size", type=int, default=224, help="Model input size (presize follows).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgclf-scale"))
    ap.add_argument("--epoch", action="store_true", help="Also time one training epoch.")
    ap.add_argument("--epoch-model", default="tf_efficientnet_lite0")
    ap.add_argument("--cache-max-gb", type=float, default=None,
                    help="Cache cap (default: imgclf's, min(20 GB, 25%% of the disk)).")
    ap.add_argument("--_measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_variant", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_epoch-model", dest="child_epoch_model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        print(json.dumps(measure(a._measure, a._variant, a._cache, a.size, a.child_epoch_model,
                                 a.cache_max_gb)))
        return
    import shutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = []
    for n in [int(s) for s in a.sizes.split(",")]:
        root = generate(a.work / f"n{n}", n, cores)
        for variant in a.variants.split(","):
            cache = a.work / f"n{n}" / f"cache-{variant}"
            shutil.rmtree(cache, ignore_errors=True)
            for warmth in ("cold", "warm"):
                epoch = a.epoch_model if a.epoch and warmth == "warm" else None
                r = _child(root, variant, cache, a.size, epoch, a.cache_max_gb)
                r.update(n=n, variant=variant, warmth=warmth)
                results.append(r)
                print(json.dumps(r), flush=True)
            shutil.rmtree(cache, ignore_errors=True)  # 100k squares at 224 px take ~20 GB
    (a.work / "results.json").write_text(json.dumps(results, indent=1))
    head = (f"{'N':>7} {'variant':7} {'run':4} " + " ".join(f"{p + ' s':>9}" for p in PHASES)
            + f" {'total s':>8} {'img/s/core':>10} {'RSS MB':>7} {'cache MB':>9} "
              f"{'cand':>6} {'epoch img/s':>11}")
    print(f"\n{cores} cores, input size {a.size}\n{head}")
    for r in results:
        total = sum(r[p] for p in PHASES)
        print(f"{r['n']:>7} {r['variant']:7} {r['warmth']:4} "
              + " ".join(f"{r[p]:9.2f}" for p in PHASES)
              + f" {total:8.2f} {r['images'] / total / cores:10.0f} {r['rss_mb']:7.0f} "
                f"{r['cache_bytes'] / 1e6:9.0f} {r['near_candidates']:6d} "
                f"{r.get('epoch_images_per_s', float('nan')):11.1f}")
    print("\ngrowth exponent k (time or memory ~ N^k) over the sizes measured:")
    for variant in a.variants.split(","):
        for warmth in ("cold", "warm"):
            rows = [r for r in results if r["variant"] == variant and r["warmth"] == warmth]
            ns = [r["n"] for r in rows]
            cols = {p: [r[p] for r in rows] for p in PHASES}
            cols["total"] = [sum(r[p] for p in PHASES) for r in rows]
            cols["rss"] = [r["rss_mb"] for r in rows]
            cols["cache"] = [r["cache_bytes"] for r in rows]
            print(f"  {variant:7} {warmth:4} " + "  ".join(
                f"{k} {_exponent(ns, v)}" for k, v in cols.items()))


if __name__ == "__main__":
    main()
