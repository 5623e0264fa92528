"""Command line: parses arguments and calls the library (imgclf.api). Nothing else lives here.

The library's modules are imported inside each command, so that `imgclf --help` and a mistyped
flag answer at once instead of after importing torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, explain and deploy image classifiers.")
console = Console(stderr=True, soft_wrap=True)  # messages stay one line each, even in logs
_debug = {"on": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _debug["on"] = debug or bool(os.environ.get("IMGCLF_DEBUG"))


@app.command()
def train(
    data: Optional[Path] = typer.Argument(None, help="Image folder (class folders), or the root of the CSV's file names."),
    csv: Optional[Path] = typer.Option(None, help="Labels CSV (file names relative to DATA)."),
    image_col: Optional[str] = typer.Option(None, help="CSV column with file names."),
    label_col: Optional[str] = typer.Option(None, help="CSV column with labels."),
    split_col: Optional[str] = typer.Option(None, help="CSV column with train/valid or an is_valid boolean."),
    label_delim: str = typer.Option(" ", help="Separator of several labels in one CSV cell."),
    label_cols: Optional[str] = typer.Option(None, help="One-hot label columns (comma-separated) or 'auto'."),
    multi_label: Optional[bool] = typer.Option(None, "--multi-label/--single-label", help="Force the task (default: detect)."),
    label_pattern: Optional[str] = typer.Option(None, help="Regex; its first group on the file name is the label."),
    group_col: Optional[str] = typer.Option(None, help="CSV column of groups kept on one side of the split."),
    group_pattern: Optional[str] = typer.Option(None, help="Regex; its first group on the relative path is the group."),
    valid_pct: float = typer.Option(0.2, help="Validation fraction when the data has no split."),
    seed: int = typer.Option(42, help="Seed for split, augmentation and initialisation."),
    model: str = typer.Option("tf_efficientnet_lite0", help="Any timm architecture."),
    weights: Optional[Path] = typer.Option(None, help="Local pretrained weights file for --model."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from ImageNet weights."),
    size: Optional[int] = typer.Option(None, help="Input size (default: the model's)."),
    epochs: int = typer.Option(5, help="Epochs with the whole network trainable."),
    freeze_epochs: int = typer.Option(1, help="Epochs training only the head on a frozen body."),
    lr: str = typer.Option("auto", help="Peak learning rate, or 'auto' (LR finder, valley rule)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    balance: str = typer.Option("auto", help="Class imbalance: none | weights | sampler | auto (weights when the largest class is over 3x the smallest)."),
    precision: str = typer.Option("auto", help="auto | 32 | bf16-mixed | 16-mixed."),
    workers: Optional[int] = typer.Option(None, help="Loader processes (default: from the core count)."),
    cache_dir: Optional[str] = typer.Option(None, help="Decode cache folder ('' disables it)."),
    deterministic: bool = typer.Option(False, help="Bit-for-bit repeatable training (slower)."),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps."),
    threshold_metric: str = typer.Option("zero_one", help="Multi-label: zero_one | hamming | f1_macro."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Folder for run directories."),
    name: Optional[str] = typer.Option(None, help="Run directory name."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run directory."),
    accelerator: str = typer.Option("auto", help="auto | cpu | gpu | ... (Lightning accelerator)."),
    devices: str = typer.Option("auto", help="Devices per machine: auto, a count, or a list like 0,1."),
    num_nodes: int = typer.Option(1, help="Machines taking part (see README: multi-node)."),
    strategy: str = typer.Option("auto", help="auto | ddp | ... (Lightning strategy)."),
    norm_stats: str = typer.Option("auto", help="Input normalisation: auto (the model's when pretrained, else computed from the training images) | imagenet | MEAN,STD | M1,M2,M3,S1,S2,S3."),
    sizes: Optional[str] = typer.Option(None, help="Progressive resizing: sizes of the training stages, small to large, e.g. 128,192,224."),
    stage_epochs: Optional[str] = typer.Option(None, help="Epochs per --sizes stage, e.g. 4,3,3 (default: --epochs split evenly)."),
    stage_schedule: str = typer.Option("continue", help="Learning rate over --sizes stages: continue (one one-cycle across them) | restart (a one-cycle per stage)."),
    mixup: float = typer.Option(0.0, help="Mixup Beta parameter (0: off; 0.2-0.4 is common)."),
    cutmix: float = typer.Option(0.0, help="CutMix Beta parameter (0: off; 1.0 is common)."),
    mixup_off_epoch: Optional[int] = typer.Option(None, help="Epoch (as numbered in metrics.csv) from which batches are no longer mixed."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing for single-label data (0.1 is usual)."),
    tta: int = typer.Option(0, help="Test-time augmentation views the saved model adds (0: off); validation is reported with and without."),
    tta_reduce: str = typer.Option("mean", help="How TTA views combine: mean | max."),
    augment_on: str = typer.Option("auto", help="Where training crops run: loader (per image) | device (batched on the GPU/CPU doing the training) | auto (device on CUDA)."),
    batchnorm: str = typer.Option("frozen", help="BatchNorm while a pretrained body fine-tunes: frozen (pretrained statistics held) | adapt (statistics re-estimated on the training images, then held) | train (each batch's)."),
    lr_mult: float = typer.Option(10.0, help="Discriminative rates: the body's first layers train at the unfrozen rate / LR_MULT, later layers at rates rising to it."),
    resize: str = typer.Option("squish", help="Images to squares: squish (whole image, aspect ignored) | crop (centre square) | auto (crop up to aspect 1.5, squish longer ones)."),
):
    """Train a classifier on labelled images and write a run directory."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)
    from imgclf.training.recipe import parse_ints  # lazy: start-up time (`imgclf --help` imports no torch)

    if resume is None and data is None:
        raise ImgclfError("pass DATA (a folder of images) or --resume RUN")
    lr_value: float | str = lr if lr == "auto" else _float(lr, "--lr")
    cfg = TrainConfig(
        data=str(data) if data else "", csv=str(csv) if csv else None, image_col=image_col,
        label_col=label_col, split_col=split_col, label_delim=label_delim, label_cols=label_cols,
        multi_label=multi_label, label_pattern=label_pattern, group_col=group_col,
        group_pattern=group_pattern, valid_pct=valid_pct, seed=seed, model=model,
        weights=str(weights) if weights else None, pretrained=pretrained, size=size,
        epochs=epochs, freeze_epochs=freeze_epochs, lr=lr_value, batch_size=batch_size,
        balance=balance,
        precision=precision, workers=workers, cache_dir=cache_dir, deterministic=deterministic,
        checkpoint_every=checkpoint_every, threshold_metric=threshold_metric, out=str(out_dir),
        name=name, accelerator=accelerator,
        devices=int(devices) if devices.isdigit() else devices, num_nodes=num_nodes,
        strategy=strategy, norm_stats=norm_stats, sizes=parse_ints(sizes, "--sizes"),
        stage_epochs=parse_ints(stage_epochs, "--stage-epochs"), stage_schedule=stage_schedule,
        mixup=mixup, cutmix=cutmix,
        mixup_off_epoch=mixup_off_epoch, label_smoothing=label_smoothing, tta=tta,
        tta_reduce=tta_reduce, augment_on=augment_on, batchnorm=batchnorm, lr_mult=lr_mult, resize=resize)
    api.train(config=cfg, resume=resume, console=console)


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ImgclfError(f"{flag} takes a number or 'auto', not {text!r}") from None


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run directory or bundle folder."),
    data: Optional[Path] = typer.Argument(None, help="Other labelled images (default: the run's validation set)."),
    csv: Optional[Path] = typer.Option(None, help="Labels CSV for DATA."),
    label_pattern: Optional[str] = typer.Option(None, help="Regex giving the label from the file name."),
    label_delim: str = typer.Option(" ", help="Separator of several labels in one CSV cell."),
    label_cols: Optional[str] = typer.Option(None, help="One-hot label columns (comma-separated) or 'auto'."),
    tta: Optional[int] = typer.Option(None, help="Augmented views to add (test-time augmentation; default: the bundle's setting); scores are shown with and without."),
    tta_reduce: Optional[str] = typer.Option(None, help="How TTA views combine: mean | max (default: the bundle's, else mean)."),
    batch_size: int = typer.Option(32),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the results."),
):
    """Score a trained model: accuracy, per-class metrics, confusion matrix, most confused."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    options = {k: v for k, v in {"csv": str(csv) if csv else None,
                                 "label_pattern": label_pattern, "label_cols": label_cols,
                                 "label_delim": label_delim if csv else None}.items() if v}
    api.evaluate(run, data, out=out_dir, tta=tta, tta_reduce=tta_reduce, batch_size=batch_size,
                 console=console, **options)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Run directory or bundle folder."),
    paths: list[str] = typer.Argument(..., help="Image files, folders or globs."),
    top_k: int = typer.Option(3, help="Labels shown per image."),
    out_csv: Optional[Path] = typer.Option(None, "--out", help="Write all probabilities to this CSV."),
    tta: Optional[int] = typer.Option(None, help="Augmented views (default: the bundle's setting)."),
    tta_reduce: Optional[str] = typer.Option(None, help="How TTA views combine: mean | max (default: the bundle's, else mean)."),
    threshold: Optional[float] = typer.Option(None, help="Multi-label: override the tuned thresholds."),
    batch_size: int = typer.Option(32),
):
    """Predict labels for images with exactly the preprocessing validation used."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    bundle = api.load(model)
    result = bundle.predict(paths, batch_size=batch_size, tta=tta, tta_reduce=tta_reduce,
                            threshold=threshold)
    if bundle.multi_label:
        from imgclf.deploy.predict import describe_thresholds  # lazy: start-up time (`imgclf --help` imports no torch)

        console.print(describe_thresholds(bundle, threshold), highlight=False)
    for p, reason in result.errors.items():
        console.print(f"[yellow]skipped[/] {reason if str(p) in reason else f'{p}: {reason}'}")
    tops = result.top_k(top_k)
    for p, labs, top in zip(result.paths, result.labels(), tops):
        shown = "  ".join(f"{c} {v:.3f}" for c, v in top)
        name = os.fsdecode(p).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        # Plain print: results are for pipes and files, never wrapped to the terminal width.
        if bundle.multi_label:
            print(f"{name}\t{{{', '.join(labs)}}}\t{shown}")
        else:
            print(f"{name}\t{shown}")
    if out_csv:
        result.to_csv(out_csv)
        console.print(f"Wrote {out_csv}")
    if not result.paths:
        raise ImgclfError("no image could be predicted")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Folder for the demo run."),
    epochs: int = typer.Option(8, help="Epochs."),
):
    """Train on a small built-in data set (scikit-learn's digits) and print where the report is."""
    from imgclf.commands.demo import run_demo  # lazy: start-up time (`imgclf --help` imports no torch)

    run_demo(out_dir, epochs=epochs, console=console)


@app.command()
def cv(
    data: Optional[Path] = typer.Argument(None, help="Image folder (class folders), or the root of the CSV's file names."),
    folds: int = typer.Option(5, help="Number of folds (stratified by class, groups kept whole)."),
    resume: Optional[Path] = typer.Option(None, help="Finish an interrupted cross-validation folder."),
    csv: Optional[Path] = typer.Option(None, help="Labels CSV (file names relative to DATA)."),
    image_col: Optional[str] = typer.Option(None, help="CSV column with file names."),
    label_col: Optional[str] = typer.Option(None, help="CSV column with labels."),
    label_delim: str = typer.Option(" ", help="Separator of several labels in one CSV cell."),
    label_cols: Optional[str] = typer.Option(None, help="One-hot label columns (comma-separated) or 'auto'."),
    multi_label: Optional[bool] = typer.Option(None, "--multi-label/--single-label", help="Force the task (default: detect)."),
    label_pattern: Optional[str] = typer.Option(None, help="Regex; its first group on the file name is the label."),
    group_col: Optional[str] = typer.Option(None, help="CSV column of groups kept within one fold."),
    group_pattern: Optional[str] = typer.Option(None, help="Regex; its first group on the relative path is the group."),
    seed: int = typer.Option(42, help="Seed for folds, augmentation and initialisation."),
    model: str = typer.Option("tf_efficientnet_lite0", help="Any timm architecture."),
    weights: Optional[Path] = typer.Option(None, help="Local pretrained weights file for --model."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Start from ImageNet weights."),
    size: Optional[int] = typer.Option(None, help="Input size (default: the model's)."),
    epochs: int = typer.Option(5, help="Epochs with the whole network trainable."),
    freeze_epochs: int = typer.Option(1, help="Epochs training only the head on a frozen body."),
    lr: str = typer.Option("auto", help="Peak learning rate, or 'auto' (LR finder, valley rule)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    balance: str = typer.Option("auto", help="Class imbalance: none | weights | sampler | auto."),
    precision: str = typer.Option("auto", help="auto | 32 | bf16-mixed | 16-mixed."),
    workers: Optional[int] = typer.Option(None, help="Loader processes (default: from the core count)."),
    cache_dir: Optional[str] = typer.Option(None, help="Decode cache folder ('' disables it)."),
    threshold_metric: str = typer.Option("zero_one", help="Multi-label: zero_one | hamming | f1_macro."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Folder for the cross-validation folder."),
    name: Optional[str] = typer.Option(None, help="Cross-validation folder name."),
):
    """Cross-validate: one normal run per fold, a mean ± std summary and out-of-fold predictions."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    if resume is None and data is None:
        raise ImgclfError("pass DATA (a folder of images) or --resume CV_DIR")
    cfg = TrainConfig(
        data=str(data) if data else "", csv=str(csv) if csv else None, image_col=image_col,
        label_col=label_col, label_delim=label_delim, label_cols=label_cols,
        multi_label=multi_label, label_pattern=label_pattern, group_col=group_col,
        group_pattern=group_pattern, seed=seed, model=model,
        weights=str(weights) if weights else None, pretrained=pretrained, size=size,
        epochs=epochs, freeze_epochs=freeze_epochs,
        lr=lr if lr == "auto" else _float(lr, "--lr"), batch_size=batch_size, balance=balance,
        precision=precision, workers=workers, cache_dir=cache_dir,
        threshold_metric=threshold_metric, out=str(out_dir), name=name)
    api.cross_validate(folds=folds, config=cfg, resume=resume, console=console)


@app.command("label-issues")
def label_issues(
    target: Path = typer.Argument(..., help="Cross-validation folder (imgclf cv) or run directory."),
):
    """Rank suspected label errors (out-of-fold or validation predictions) into label_issues.csv."""
    from imgclf.commands.label_issues import find_label_issues  # lazy: start-up time (`imgclf --help` imports no torch)

    find_label_issues(target, console=console)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Run directory or bundle folder."),
    format: str = typer.Option("onnx", "--format", help="onnx | torchscript."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: 17; 18 with --exporter dynamo)."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Any batch size, or one image per call."),
    exporter: str = typer.Option("torchscript", help="ONNX exporter: torchscript | dynamo (needs onnxscript)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Output file (default: next to model.json)."),
    images: Optional[list[Path]] = typer.Option(None, "--images", help="Images for the parity check (default: the run's validation images)."),
    max_images: int = typer.Option(500, help="Parity check on at most this many images."),
    check: bool = typer.Option(True, "--check/--no-check", help="Refuse to write an export that does not reproduce the bundle."),
):
    """Export a model to ONNX or TorchScript, checked to predict what the bundle predicts."""
    from imgclf.deploy.export import export as export_bundle  # lazy: start-up time (`imgclf --help` imports no torch)

    export_bundle(model, format=format, out=out_file, opset=opset, dynamic_batch=dynamic_batch,
                  exporter=exporter, check=check, images=images, max_images=max_images,
                  console=console)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Run directory or bundle folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Server processes, each with its own copy of the model."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body in MB (413 above)."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image in pixels (refused from its header)."),
    max_files: int = typer.Option(64, help="Most images in one request."),
    max_batch: int = typer.Option(32, help="Most images in one forward pass (concurrent requests are batched)."),
    upload_timeout: float = typer.Option(30.0, help="Seconds a request body may take to arrive (408 after)."),
    predict_timeout: float = typer.Option(60.0, help="Seconds a queued prediction may take (503 after)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per process (default: cores / workers)."),
):
    """Serve a model over HTTP: POST /predict, GET /health, GET /model."""
    from imgclf.deploy.serve import ServeConfig, run_server  # lazy: start-up time (`imgclf --help` imports no torch)

    run_server(ServeConfig(bundle=str(model), max_upload_bytes=int(max_upload_mb * 1e6),
                           max_pixels=max_pixels, max_files=max_files, max_batch=max_batch,
                           upload_timeout=upload_timeout, predict_timeout=predict_timeout,
                           threads=threads),
               host=host, port=port, workers=workers, console=console)


@app.command()
def mine(
    run: Path = typer.Argument(..., help="Run directory of a trained model."),
    pool: Optional[Path] = typer.Option(None, help="Folder of unlabelled images that contain none of the classes."),
    per_round: Optional[int] = typer.Option(None, help="Hard negatives added per round [default: 10]."),
    rounds: Optional[int] = typer.Option(None, help="Mining rounds after round 0 [default: 3]."),
    epochs: Optional[int] = typer.Option(None, help="Whole-network epochs per round [default: 2]."),
    initial: Optional[int] = typer.Option(None, help="Pool images seeding a new negative class in round 0 [default: --per-round]."),
    negative_label: Optional[str] = typer.Option(None, help="Name of the negative class [default: negative]."),
    valid_negatives: Optional[Path] = typer.Option(None, help="Held-out negatives (then the whole pool is mined)."),
    pool_valid_pct: Optional[float] = typer.Option(None, help="Pool fraction held out for validation [default: 0.2]."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many rounds without improvement [default: 2]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate per round [default: the run's]."),
    freeze_epochs: Optional[int] = typer.Option(None, help="Head-only epochs before each round's fine-tuning [default: 1]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass when scoring [default: 64]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the pool split and training [default: the run's]."),
    resume: bool = typer.Option(False, help="Continue an interrupted mining (rerunning the command does too)."),
    restart: bool = typer.Option(False, help="Undo earlier mining of RUN and start over."),
):
    """Hard negative mining: add a negative class and train on the pool's most confident mistakes."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    api.mine(run, pool, per_round=per_round, rounds=rounds, epochs=epochs, initial=initial,
             negative_label=negative_label, valid_negatives=valid_negatives,
             pool_valid_pct=pool_valid_pct, patience=patience, lr=lr, freeze_epochs=freeze_epochs,
             batch_size=batch_size, seed=seed, resume=resume, restart=restart, console=console)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Draw Grad-CAM heatmaps (loads the model)."),
):
    """Rebuild report.html and the PNGs in plots/ of a run."""
    from imgclf.report.html import write_report  # lazy: start-up time (`imgclf --help` imports no torch)

    path = write_report(run, console=console, heatmaps=heatmaps)
    console.print(f"Report: [bold]{path}[/]")


def main() -> None:
    """Entry point: user-facing errors become one clear line and exit code 2."""
    try:
        app()
    except ImgclfError as e:
        if _debug["on"]:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
        if _debug["on"]:
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                      "(run again with --debug for the traceback, and please report it)",
                      highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
