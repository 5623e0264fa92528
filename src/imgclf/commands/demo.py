"""`imgclf demo`: the whole flow on a data set that ships with scikit-learn, no download needed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.commands import train as train_cmd

log = logging.getLogger(__name__)


def make_digits_folder(root: str | Path, per_class: int = 40, side: int = 48, seed: int = 0) -> Path:
    """Render scikit-learn's 8x8 handwritten digits as `root/<digit>/<n>.png` class folders.

    Each digit is upscaled to `side` pixels and drawn as dark ink on a light, slightly tinted
    background so that it looks like a (tiny) photo rather than a raw array.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for d, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(digits.target == d)[:per_class]
        for n, i in enumerate(idx):
            ink = digits.images[i] / 16.0
            tint = rng.uniform(200, 250, size=3)
            rgb = (tint[None, None, :] * (1 - ink[..., None])).astype(np.uint8)
            img = Image.fromarray(rgb).resize((side, side), Image.Resampling.BICUBIC)
            img.save(folder / f"{n:03d}.png")
    return root


def run_demo(out: str | Path = "runs", epochs: int = 8):
    """Build the digits folder, train a small model from scratch, log where the results are."""
    out = Path(out)
    data = make_digits_folder(out / "demo-data", per_class=60)
    log.info("Demo data: %s (scikit-learn digits as class folders)", data)
    run = train_cmd.train(data, out=str(out), name=None, model="resnet10t", pretrained=False,
                          size=64, epochs=epochs, freeze_epochs=0, lr=3e-3, batch_size=32)
    log.info("\nOpen the report in a browser: %s\nPredict with the bundle:  imgclf predict %s "
             "%s/seven/000.png", run.report_path, run.path, data)
    return run
