"""What the frozen stage costs, in forward passes over the data (issue 7). Run by hand:

    .venv/bin/python benchmarks/frozen_stage.py [--data fridge|caltech] [--freeze-epochs 1]

The frozen stage (body features cached once per view, the LR finder and the head's training on
those features, validation) is timed inside `imgclf.train` with no unfrozen epochs
(`train_seconds` in metrics.json covers exactly the recipe, not data loading or the report).
A forward pass is then timed the way anyone would compute the body's output: the same model in
eval mode over the same decoded training and validation images, same batch size and precision.
The decode cache is warmed first, so neither side pays for decoding; each side is timed
--repeats times and the medians are compared (single runs of a few seconds vary by 20%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = {"fridge": SHARED / "data" / "fridgeObjects",
        "caltech": SHARED / "data" / "caltech101_subset"}
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=sorted(DATA), default="fridge")
    ap.add_argument("--freeze-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3,
                    help="Time each side this many times and compare the medians.")
    args = ap.parse_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", tempfile.mkdtemp(prefix="imgclf-frozen-"))

    import torch

    from imgclf import api
    from imgclf.commands import train as train_cmd
    from imgclf.training import fine_tune, models
    from imgclf.config import TrainConfig
    from imgclf.data.samples import TRAIN, VALID
    from imgclf.data.transforms import Preprocess, normalize

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = tempfile.mkdtemp(prefix="imgclf-frozen-runs-")
    opts = dict(model="tf_efficientnet_lite0", weights=str(WEIGHTS), epochs=0,
                freeze_epochs=args.freeze_epochs, batch_size=args.batch_size, seed=42)
    # Warm the decode cache (and the process) with a first run; time the next ones.
    api.train(DATA[args.data], out=out, name="warm", **opts)
    frozen_times = []
    for r in range(args.repeats):
        run = api.train(DATA[args.data], out=out, name=f"timed{r}", **opts)
        frozen_times.append(run.metrics()["train_seconds"])

    cfg = TrainConfig(data=str(DATA[args.data]), **opts)
    model = models.create_model(cfg.model, len(run.metrics()["classes"]), weights=cfg.weights)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg)
    prep = train_cmd.prepare_data(cfg, pre)
    idx = [prep.index[s.path] for s in prep.table.split(TRAIN) + prep.table.split(VALID)]
    precision = fine_tune.resolve_precision("auto", model)
    model = model.eval().to(memory_format=torch.channels_last)
    forward_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.no_grad(), fine_tune.autocast_context(precision, torch.device("cpu")):
            for s in range(0, len(idx), args.batch_size):
                batch = torch.stack([torch.from_numpy(prep.decoded.get(i)) for i in
                                     idx[s:s + args.batch_size]])
                x = normalize(batch[..., :pre.size, :pre.size], pre.mean, pre.std)
                model(x.contiguous(memory_format=torch.channels_last))
        forward_times.append(time.perf_counter() - t0)
    frozen_s, forward_s = statistics.median(frozen_times), statistics.median(forward_times)
    n_tr, n_va = len(prep.table.split(TRAIN)), len(prep.table.split(VALID))
    print(f"{args.data}: {n_tr} train + {n_va} valid images, {args.freeze_epochs} frozen "
          f"epoch(s), precision {precision}")
    print(f"frozen stage (feature cache + LR finder + head training + validation): "
          f"{frozen_s:.2f}s (median of {' '.join(f'{t:.2f}' for t in frozen_times)})")
    print(f"one forward pass over the same images: {forward_s:.2f}s "
          f"(median of {' '.join(f'{t:.2f}' for t in forward_times)})")
    print(f"frozen stage = {frozen_s / forward_s:.2f} forward passes "
          f"({'PASS' if frozen_s / forward_s <= 1.5 else 'FAIL'}: target <= 1.5)")


if __name__ == "__main__":
    main()
