"""Command line: parses arguments and calls the library (imgclf.api). Nothing else lives here.

The training flags of `train` and `cv` are generated from TrainConfig (imgclf.cli.options).
While a command runs, the library's log records and progress are drawn on the console
(imgclf.cli.console), tables included (imgclf.cli.render).

The library's modules are imported inside each command, so that `imgclf --help` and a mistyped
flag answer at once instead of after importing torch.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from imgclf.cli.console import command_output, console
from imgclf.cli.options import (config_from_flags, config_options, field_option,
                                given_on_command_line)
from imgclf.errors import ImgclfError

# Where the command is the process (`script()`), a --time-budget counts from here, 0.2 s in
# (typer and rich imported): a user's "5 minutes" include the seconds torch and the rest take
# to import. Called from Python (tests, notebooks), it counts from the call.
_IMPORTED = time.monotonic()
_budget_start: dict[str, float | None] = {"at": None}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, explain and deploy image classifiers.")
_debug = {"on": False}


@app.callback()
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _debug["on"] = debug or bool(os.environ.get("IMGCLF_DEBUG"))
    # For the command's duration (click closes the context when it ends, however it ends).
    ctx.with_resource(command_output(console))


@app.command()
@config_options(own={"resume": (Optional[Path], typer.Option(None, help="Continue an interrupted run directory."))})
def train(resume: Optional[Path] = None, **flags):
    """Train a classifier on labelled images and write a run directory."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    if resume is None and flags["data"] is None and flags["config"] is None:
        raise ImgclfError("pass DATA (a folder of images), --config FILE or --resume RUN")
    api.train(config=config_from_flags(flags), resume=resume,
              budget_start=_budget_start["at"])


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run directory or bundle folder."),
    data: Optional[Path] = typer.Argument(None, help="Other labelled images (default: the run's validation set)."),
    csv: Optional[Path] = field_option("csv"),
    image_col: Optional[str] = field_option("image_col"),
    label_col: Optional[str] = field_option("label_col"),
    split_col: Optional[str] = field_option("split_col"),
    label_pattern: Optional[str] = field_option("label_pattern"),
    label_delim: str = field_option("label_delim"),
    label_cols: Optional[str] = field_option("label_cols"),
    multi_label: Optional[bool] = field_option("multi_label"),
    tta: Optional[int] = typer.Option(None, help="Augmented views to add (test-time augmentation; default: the bundle's setting); scores are shown with and without."),
    tta_reduce: Optional[str] = typer.Option(None, help="How TTA views combine: mean | max (default: the bundle's, else mean)."),
    batch_size: int = typer.Option(32),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the results."),
):
    """Score a trained model: accuracy, per-class metrics, confusion matrix, most confused."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    options = {k: v for k, v in {"csv": str(csv) if csv else None, "image_col": image_col,
                                 "label_col": label_col, "split_col": split_col,
                                 "label_pattern": label_pattern, "label_cols": label_cols,
                                 "label_delim": label_delim if csv else None}.items() if v}
    if multi_label is not None:
        options["multi_label"] = multi_label
    api.evaluate(run, data, out=out_dir, tta=tta, tta_reduce=tta_reduce, batch_size=batch_size,
                 **options)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Run directory, bundle folder, or an exported .onnx / OpenVINO .xml file (imgclf export)."),
    paths: list[str] = typer.Argument(..., help="Image files, folders or globs."),
    top_k: int = typer.Option(3, min=1, help="Labels shown per image (at least 1)."),
    out_csv: Optional[Path] = typer.Option(None, "--out", help="Write all probabilities to this CSV."),
    tta: Optional[int] = typer.Option(None, help="Augmented views (default: the bundle's setting)."),
    tta_reduce: Optional[str] = typer.Option(None, help="How TTA views combine: mean | max (default: the bundle's, else mean)."),
    threshold: Optional[float] = typer.Option(None, help="Multi-label: override the tuned thresholds."),
    batch_size: int = typer.Option(32),
):
    """Predict labels for images with exactly the preprocessing validation used."""
    from imgclf.deploy.exported import is_export_file, load_exported  # lazy: start-up time

    if is_export_file(model):  # an export runs torch-free, on its own runtime
        bundle = load_exported(model)
    else:
        from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

        bundle = api.load(model)
    result = bundle.predict(paths, batch_size=batch_size, tta=tta, tta_reduce=tta_reduce,
                            threshold=threshold)
    if bundle.multi_label:
        from imgclf.deploy.predict import describe_thresholds  # lazy: start-up time (`imgclf --help` imports no torch)

        console.print(describe_thresholds(bundle, threshold), highlight=False)
    for p, reason in result.errors.items():
        console.print(Text.assemble(("skipped", "yellow"),
                                    f" {reason if str(p) in reason else f'{p}: {reason}'}"))
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

    run_demo(out_dir, epochs=epochs)


@app.command()
@config_options(
    own={"folds": (int, typer.Option(5, help="Number of folds (stratified by class, groups kept whole).")),
            "resume": (Optional[Path], typer.Option(None, help="Finish an interrupted cross-validation folder."))},
    skip=("folds", "fold"),  # cv deals the folds itself
    help={"group_col": "CSV column of groups kept within one fold.",
          "seed": "Seed for folds, augmentation and initialisation.",
          "out": "Folder for the cross-validation folder.",
          "name": "Cross-validation folder name."})
def cv(folds: int = 5, resume: Optional[Path] = None, **flags):
    """Cross-validate: one normal run per fold, a mean ± std summary and out-of-fold predictions."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    if resume is None and flags["data"] is None and flags["config"] is None:
        raise ImgclfError("pass DATA (a folder of images), --config FILE or --resume CV_DIR")
    config = config_from_flags(flags)
    if (flags["config"] is not None and config.folds >= 2
            and not given_on_command_line(flags["ctx"], "folds")):
        folds = config.folds  # a cv_config.yaml (or a fold's config.yaml) names its folds
    api.cross_validate(folds=folds, config=config, resume=resume)


@app.command("label-issues")
def label_issues(
    target: Path = typer.Argument(..., help="Cross-validation folder (imgclf cv) or run directory."),
):
    """Rank suspected label errors (out-of-fold or validation predictions) into label_issues.csv."""
    from imgclf.commands.label_issues import find_label_issues  # lazy: start-up time (`imgclf --help` imports no torch)

    find_label_issues(target, refresh_report=True)


@app.command()
def review(
    target: Path = typer.Argument(..., help="Run directory or cross-validation folder (imgclf cv)."),
    port: int = typer.Option(8765, help="Port."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
):
    """Review suspected label errors in the browser; decisions go to TARGET/corrections.csv."""
    from imgclf.commands.review import run_review  # lazy: start-up time (`imgclf --help` imports no torch)

    run_review(target, host=host, port=port)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Run directory or bundle folder."),
    format: str = typer.Option("onnx", "--format", help="onnx | openvino (IR .xml + .bin; pip install openvino) | torchscript."),
    int8: bool = typer.Option(False, "--int8", help="Static int8 quantization with NNCF (onnx, openvino; pip install nncf), calibrated on the run's training images; checked by agreement (>= 99%) and accuracy (<= 0.5 points lower)."),
    calibration: Optional[list[Path]] = typer.Option(None, "--calibration", help="Images to calibrate --int8 on (default: the run's training images)."),
    # 300 is deploy.quantize.CALIBRATION_IMAGES, not imported here (start-up time).
    calibration_images: int = typer.Option(300, help="Calibrate --int8 on at most this many images."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: 17; 18 with --exporter dynamo)."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Any batch size, or one image per call."),
    exporter: str = typer.Option("torchscript", help="ONNX exporter: torchscript | dynamo (needs onnxscript)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Output file (default: next to model.json)."),
    images: Optional[list[Path]] = typer.Option(None, "--images", help="Images for the parity check (default: the run's validation images)."),
    max_images: int = typer.Option(500, help="Parity check on at most this many images."),
    check: bool = typer.Option(True, "--check/--no-check", help="Refuse to write an export that does not reproduce the bundle."),
):
    """Export a model to ONNX, OpenVINO or TorchScript, checked to predict what the bundle predicts."""
    from imgclf.deploy.export import export as export_bundle  # lazy: start-up time (`imgclf --help` imports no torch)

    export_bundle(model, format=format, out=out_file, opset=opset, dynamic_batch=dynamic_batch,
                  exporter=exporter, check=check, images=images, max_images=max_images,
                  int8=int8, calibration=calibration, calibration_images=calibration_images)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Run directory, bundle folder, or an exported .onnx / OpenVINO .xml file."),
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
    max_pixels_in_flight: int = typer.Option(100_000_000, min=1, help="Pixels decoded at once across all requests (bounds memory; more wait, 503 after --predict-timeout)."),
):
    """Serve a model over HTTP: POST /predict, GET /health, GET /model."""
    from imgclf.deploy.serve import ServeConfig, run_server  # lazy: start-up time (`imgclf --help` imports no torch)

    run_server(ServeConfig(bundle=str(model), max_upload_bytes=int(max_upload_mb * 1e6),
                           max_pixels=max_pixels, max_files=max_files, max_batch=max_batch,
                           upload_timeout=upload_timeout, predict_timeout=predict_timeout,
                           threads=threads, max_pixels_in_flight=max_pixels_in_flight),
               host=host, port=port, workers=workers)


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
    logger: Optional[list[str]] = typer.Option(None, help="Trackers for the rounds: csv | tensorboard | mlflow [default: the run's --logger, continuing its tracked run]."),
    config: Optional[Path] = typer.Option(None, "--config", help="Settings file (YAML, these options' names with underscores); flags given override it."),
    corrections: Optional[Path] = typer.Option(None, help="Corrections CSV (imgclf review): applied to the labelled images and the pool when mining starts."),
):
    """Hard negative mining: add a negative class and train on the pool's most confident mistakes."""
    from imgclf import api  # lazy: start-up time (`imgclf --help` imports no torch)

    api.mine(run, pool, per_round=per_round, rounds=rounds, epochs=epochs, initial=initial,
             negative_label=negative_label, valid_negatives=valid_negatives,
             pool_valid_pct=pool_valid_pct, patience=patience, lr=lr, freeze_epochs=freeze_epochs,
             batch_size=batch_size, seed=seed, resume=resume, restart=restart,
             logger=logger or None, config=config, corrections=corrections)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Draw Grad-CAM heatmaps (loads the model)."),
):
    """Rebuild report.html and the PNGs in plots/ of a run."""
    from imgclf.report.html import write_report  # lazy: start-up time (`imgclf --help` imports no torch)

    path = write_report(run, heatmaps=heatmaps)
    console.print(Text.assemble("Report: ", (str(path), "bold")))


@app.command()
def runs(
    folder: Path = typer.Argument(Path("runs"), help="Folder holding run directories (searched recursively)."),
    sort: str = typer.Option("finished", help="Row order: finished (oldest first) | score (best first) | run (path)."),
):
    """List the runs under a folder: data, model, recipe, accuracy, training time, date."""
    from rich.console import Console

    from imgclf.cli.render import runs as draw_runs  # lazy: start-up time
    from imgclf.commands.runs import list_runs  # lazy: start-up time (`imgclf --help` imports no torch)

    rows = list_runs(folder, sort=sort)
    if not rows:
        raise ImgclfError(f"no run directories (folders with a config.yaml) under {folder}")
    draw_runs(Console(), rows, f"{len(rows)} runs under {folder}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    out_file: Path = typer.Option(Path("compare.html"), "--out", help="The HTML page to write."),
):
    """Compare runs on one HTML page: their curves overlaid and the settings that differ."""
    from imgclf.commands.runs import compare as compare_runs  # lazy: start-up time (`imgclf --help` imports no torch)

    path = compare_runs(runs, out_file)
    console.print(Text.assemble("Comparison: ", (str(path), "bold")))


cache_app = typer.Typer(no_args_is_help=True, help="Show or free the decode cache.")
app.add_typer(cache_app, name="cache")
_CACHE_DIR = typer.Option(None, "--cache-dir", help="Cache folder (default: $IMGCLF_CACHE_DIR, "
                          "else ~/.cache/imgclf).")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = _CACHE_DIR):
    """Where the decode cache is, how many images and bytes it holds, per presize setting."""
    from imgclf.cli.render import cache_info as draw  # lazy: start-up time
    from imgclf.data.cache import cache_info as info  # lazy: start-up time (imports torch)

    draw(console, info(cache_dir, with_max=True))


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = _CACHE_DIR):
    """Delete the decode cache's images and index (the next run decodes again)."""
    from imgclf.data.cache import clear_cache  # lazy: start-up time (imports torch)

    before = clear_cache(cache_dir)
    console.print(f"Freed {before.bytes / 1e9:.2f} GB ({before.entries} images) in "
                  f"{before.location}", highlight=False)


def main() -> None:
    """Entry point: user-facing errors become one clear line and exit code 2."""
    try:
        app()
    except ImgclfError as e:
        if _debug["on"]:
            raise
        # Text, not markup: messages name files and classes, which may hold brackets.
        console.print(Text.assemble(("error:", "bold red"), f" {e}"))
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the user gets one line; --debug shows the rest
        if _debug["on"]:
            raise
        console.print(Text.assemble(("internal error:", "bold red"), f" {type(e).__name__}: {e} "
                                    "(run again with --debug for the traceback, and please "
                                    "report it)"))
        sys.exit(1)


def script() -> None:
    """The `imgclf` command: `main()`, then an exit that skips tearing the interpreter down.

    Finalising the modules a training command loads (torch, Lightning, timm, matplotlib) takes
    1.6-2 s on this project's 2-core machine, after the last line is printed: a fifth of a
    small run's wall time. The command's own exit handlers still run (registered after this
    one, they run before it); then logs and streams are flushed and the process ends with
    the command's exit code. Only the console script does this: `main()` called from Python
    (tests, notebooks) returns or raises as usual.
    """
    code = {"value": 0}
    _budget_start["at"] = _IMPORTED

    def _end_now() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code["value"])

    atexit.register(_end_now)  # first registered, so it runs after every later handler
    try:
        main()
    except SystemExit as stop:
        code["value"] = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    except BaseException:  # --debug lets a traceback through: Python prints it, exit code 1
        code["value"] = 1
        raise


if __name__ == "__main__":
    script()
