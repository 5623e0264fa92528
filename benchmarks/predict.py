"""Inference and training throughput against the hardware (issue 7). Run by hand:

    .venv/bin/python benchmarks/predict.py [--images 1000] [--batch-size 64]

1. `Bundle.predict` (what `imgclf predict` runs: decode, presize, crop, normalise, forward) on N
   real photos, against the raw timm forward on already-decoded tensors at the same batch size,
   in the same process.
2. Training-step throughput of the default model in GFLOP/s (FLOPs counted by
   torch.utils.flop_counter, forward + backward) in float32 and bf16 autocast, against this
   machine's measured matrix-multiply peak in the same precisions.
3. Peak memory of scoring a mining pool (`imgclf mine`'s chunked scorer) of N and 10 x N
   distinct images, to show memory does not grow with the size of the pool.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
PHOTOS = SHARED / "data" / "imagenette2_224_subset"


def make_bundle(folder: Path):
    from imgclf.deploy import bundle
    from imgclf.training import models
    from imgclf.data.transforms import Preprocess

    model = models.create_model("tf_efficientnet_lite0", 10, weights=WEIGHTS).eval()
    pre = Preprocess.from_model_cfg(model.pretrained_cfg)
    bundle.save_bundle(folder, model, "tf_efficientnet_lite0", [str(i) for i in range(10)],
                       False, pre)
    return bundle.load(folder)


def photos(n: int) -> list[Path]:
    files = sorted(PHOTOS.rglob("*.JPEG"))
    return (files * (n // max(len(files), 1) + 1))[:n]


def predict_vs_raw(n: int, batch_size: int) -> None:
    import numpy as np
    import torch

    from imgclf.data.cache import decode_all
    from imgclf.data.transforms import center_crop, normalize

    b = make_bundle(Path(tempfile.mkdtemp()) / "model")
    files = photos(n)
    b.predict(files[:batch_size], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    res = b.predict(files, batch_size=batch_size)
    t_predict = time.perf_counter() - t0
    images, _, _ = decode_all(files, b.preprocess, None, progress=False)
    batches = [normalize(center_crop(torch.from_numpy(np.stack(
        [images.get(i) for i in range(s, min(s + batch_size, len(files)))])), b.preprocess.size),
        b.preprocess.mean, b.preprocess.std).contiguous(memory_format=torch.channels_last)
        for s in range(0, len(files), batch_size)]
    model = b.model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(batches[0])
        t0 = time.perf_counter()
        for x in batches:
            model(x)
        t_raw = time.perf_counter() - t0
    print(f"predict: {len(res.paths)} images in {t_predict:.2f}s = {len(res.paths) / t_predict:.1f} img/s "
          f"(decode + preprocess + forward)")
    print(f"raw timm forward on decoded tensors: {n / t_raw:.1f} img/s")
    print(f"predict / raw throughput: {t_raw / t_predict:.2%}")


def gflops_vs_peak(batch_size: int) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imgclf.training import models

    def peak(dtype) -> float:
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            a @ b
        return 2 * 2048**3 * reps / (time.perf_counter() - t0) / 1e9

    p32, p16 = peak(torch.float32), peak(torch.bfloat16)
    print(f"matmul peak: fp32 {p32:.0f} GFLOP/s, bf16 {p16:.0f} GFLOP/s")
    for arch, layout in [(a, f) for a in ("tf_efficientnet_lite0", "resnet50")
                         for f in ("channels_last", "contiguous")]:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = models.create_model(arch, 10, pretrained=False).to(memory_format=fmt)
        x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch_size,))
        opt = torch.optim.AdamW(model.parameters())
        # Forward FLOPs x 3 (backward costs about twice the forward): torch's counter
        # over-counts the backward of depthwise convolutions by an order of magnitude.
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        flops = 3 * fc.get_total_flops()
        for name, ctx, pk in (("fp32", torch.autocast("cpu", enabled=False), p32),
                              ("bf16", torch.autocast("cpu", dtype=torch.bfloat16), p16)):
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                with ctx:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t0)
            t = min(times[1:])
            achieved = flops / t / 1e9
            print(f"train step {arch:21} {layout:13} {name}: {batch_size / t:6.1f} img/s, "
                  f"{achieved:6.0f} GFLOP/s "
                  f"= {achieved / pk:.1%} of {name} matmul peak ({flops / batch_size / 1e9:.2f} GFLOP/img)")


def memory_child(n: int, batch_size: int, cache: str) -> None:
    os.environ["IMGCLF_CACHE_DIR"] = cache
    from imgclf.data.cache import default_cache_dir

    from imgclf.commands.mine import score_pool

    b = make_bundle(Path(tempfile.mkdtemp()) / "model")
    # Distinct files (symbolic links to the photos would share content digests, and the pool
    # scorer skips repeated content): the photos cycled, each copy one pixel different.
    files = pool_files(n)
    score = score_pool(b.model, b.preprocess, files, False, 0, None, b.classes, k=50,
                       skip_digests=set(), cache_dir=default_cache_dir(), batch_size=batch_size)
    print(f"MEM {n} {score.scored} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def pool_files(n: int) -> list[Path]:
    """n distinct small JPEGs made from the photos (written once into a shared folder)."""
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.gettempdir()) / "imgclf-bench-pool"
    folder.mkdir(exist_ok=True)
    sources = photos(min(n, 200))
    out = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if not p.is_file():
            a = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB").resize((160, 160)))
            a = a.copy()
            a[0, 0] = (i % 256, (i // 256) % 256, (i // 65536) % 256)
            Image.fromarray(a).save(p, quality=90)
        out.append(p)
    return out


def memory(n: int, batch_size: int) -> None:
    cache = tempfile.mkdtemp(prefix="imgclf-mem-")
    peaks = {}
    for count in (n, 10 * n):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(count),
                              "--batch-size", str(batch_size), "--cache", cache],
                             capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM")]
        if not line:
            print(out.stderr[-2000:])
            return
        _, c, got, mb = line[-1].split()
        peaks[count] = float(mb)
        print(f"mining pool scoring over {c} images: peak RSS {mb} MB")
    print(f"peak memory {10 * n} vs {n} images: {peaks[10 * n] / peaks[n]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--memory-child", type=int)
    ap.add_argument("--cache")
    ap.add_argument("--skip", nargs="*", default=[], choices=["predict", "gflops", "memory"])
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch_size, args.cache)
        return
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if "predict" not in args.skip:
        predict_vs_raw(args.images, args.batch_size)
    if "gflops" not in args.skip:
        gflops_vs_peak(32)
    if "memory" not in args.skip:
        memory(args.images, args.batch_size)


if __name__ == "__main__":
    main()
