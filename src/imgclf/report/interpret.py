"""Error analysis from Python: what a trained classifier gets wrong, and where it looks.

    from imgclf.report.interpret import Interpretation

    interp = Interpretation.from_run("runs/fridge")
    interp.most_confused(min_count=2)            # [("water_bottle", "milk_bottle", 3), ...]
    cm, fig = interp.confusion(plot=True)        # counts, and a matplotlib figure
    interp.confused("cat", "deer", k=6)          # the cats with the highest deer probability
    maps = interp.heatmap(interp.top_losses(1)[0].index)

Convention: every analysis method returns plain data (numpy arrays, lists, dicts, dataclasses).
Called with `plot=True` it returns `(data, figure)` instead, where the figure is a matplotlib
Figure the caller may show, or save with `imgclf.report.plots.save(fig, "x.png")`. All numbers
come from `imgclf.evaluation`; this module only selects, labels and draws them. The run report
(`imgclf.report.html`) is built from the same methods.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf import evaluation
from imgclf.config import TrainConfig
from imgclf.data.images import open_rgb
from imgclf.data.sources import load_table
from imgclf.errors import DataError, ImgclfError
from imgclf.evaluation import Predictions
from imgclf.rundir import RunDir


@dataclass
class Example:
    """One validation image with what the model made of it.

    Attributes:
        index: Row in the predictions.
        path: The image file.
        actual: Its labels (one for single-label data).
        predicted: The predicted labels (one for single-label data).
        loss: Its loss (cross-entropy, or mean BCE for multi-label).
        probs: The probability of every class [C].
        classes: Class names, in the order of `probs`.
        multi_label: Whether `probs` are independent sigmoids.
    """

    index: int
    path: str
    actual: list[str]
    predicted: list[str]
    loss: float
    probs: np.ndarray = field(repr=False)
    classes: list[str] = field(repr=False)
    multi_label: bool = False

    @property
    def correct(self) -> bool:
        """Prediction right (multi-label: the whole label set)."""
        return sorted(self.actual) == sorted(self.predicted)

    @property
    def probability(self) -> float:
        """The highest class probability (single-label: that of the prediction)."""
        return float(self.probs.max()) if self.probs.size else float("nan")

    def prob(self, name: str) -> float:
        """The probability of class `name`."""
        return float(self.probs[self.classes.index(name)])

    def caption(self) -> str:
        """A short description: actual / predicted, probability and loss."""
        if not self.multi_label:
            a, p = self.actual[0], self.predicted[0]
            return f"{a} → {p} ({self.prob(p):.2f}), loss {self.loss:.2f}"
        a, p = " ".join(self.actual) or "(none)", " ".join(self.predicted) or "(none)"
        return f"{a} → {p}, loss {self.loss:.2f}"


@dataclass
class Interpretation:
    """Error analysis of a classifier on labelled images (usually a run's validation set).

    Build one with `from_run`, `from_bundle` or `from_predictions`.

    Attributes:
        predictions: Probabilities, targets and paths of the analysed images.
        bundle_path: The model bundle, needed only for heatmaps.
        run_path: The run directory, when built from a run.
        history: metrics.csv rows (empty when not from a run).
        lr_find_data: lr_find.json: lrs, losses, suggestion (None when the finder did not run).
        data_summary: data_summary.json: {"summary": ..., "checks": ...} (None when absent).
        threshold_search: thresholds.json (multi-label threshold search), None when absent.
    """

    predictions: Predictions
    bundle_path: Path | None = None
    run_path: Path | None = None
    history: list[dict] = field(default_factory=list)
    lr_find_data: dict | None = None
    data_summary: dict | None = None
    threshold_search: dict | None = None
    _bundle: object = field(default=None, repr=False)

    # -----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Interpretation":
        """The validation predictions of a run directory, with its history and side files.

        Raises:
            ImgclfError: Not a run directory, or the run has no predictions.csv yet.
        """
        run = RunDir(run_dir)
        path = run.path / "predictions.csv"
        if not path.is_file():
            raise ImgclfError(f"{run.path} has no predictions.csv: the run did not finish; "
                              f"finish it with `imgclf train --resume {run.path}`")
        meta = _read_json(run.bundle_path / "model.json") or {}
        search = _read_json(run.path / "thresholds.json")
        task = meta.get("task") or run.metrics().get("task")
        multi_label = None if task is None else task == "multi_label"
        thresholds = (search or {}).get("thresholds") or meta.get("thresholds")
        preds = Predictions.from_csv(path, multi_label=multi_label,
                                     thresholds=None if thresholds is None else np.asarray(thresholds))
        return cls(
            predictions=preds,
            bundle_path=run.bundle_path if (run.bundle_path / "model.json").is_file() else None,
            run_path=run.path,
            history=run.history(),
            lr_find_data=_read_json(run.path / "lr_find.json"),
            data_summary=_read_json(run.path / "data_summary.json"),
            threshold_search=search,
        )

    @classmethod
    def from_bundle(cls, bundle: str | Path, data: str | Path, batch_size: int = 32,
                    **source_options) -> "Interpretation":
        """Predict a labelled folder or CSV with a bundle and analyse the result.

        Args:
            bundle: Run directory or bundle folder.
            data: Labelled images, as for `imgclf train` (a folder, or the root of a CSV's files).
            batch_size: Images per forward pass.
            **source_options: Data-source options (csv, label_col, label_pattern, ...).

        Raises:
            ImgclfError: Bad bundle or data, or no image with a label the model knows.
        """
        # lazy: these import torch, which the analyses of existing predictions never need
        from imgclf.data.cache import decode_all, default_cache_dir
        from imgclf.deploy.bundle import load
        from imgclf.deploy.predict import predict_images
        from imgclf.training.task import Task

        b = load(bundle)
        cfg = dataclasses.replace(TrainConfig(), data=str(data), **source_options)
        known = set(b.classes)
        samples = [s for s in load_table(cfg).samples if set(s.labels) <= known]
        if not samples:
            raise DataError(f"{data}: no image carries a label the model knows "
                            f"({', '.join(b.classes[:10])}): check the data and the bundle")
        decoded, _, _ = decode_all([s.path for s in samples], b.preprocess, default_cache_dir(),
                                   progress=False)
        by_path = {s.path: s for s in samples}
        used = [by_path[p] for p in decoded.paths]
        task = Task(tuple(b.classes), b.multi_label)
        probs = predict_images(b.model, b.preprocess, decoded, b.multi_label,
                               batch_size=batch_size)
        preds = Predictions(paths=[str(s.path) for s in used], classes=list(b.classes),
                            probs=probs, targets=task.targets_numpy(task.encode(used)),
                            multi_label=b.multi_label,
                            thresholds=b.decision_thresholds() if b.multi_label else None)
        return cls(predictions=preds, bundle_path=b.path, _bundle=b)

    @classmethod
    def from_predictions(cls, predictions: Predictions, bundle=None) -> "Interpretation":
        """Analyse existing predictions; `bundle` (a Bundle or its path) enables heatmaps."""
        if bundle is None or isinstance(bundle, (str, Path)):
            return cls(predictions=predictions, bundle_path=Path(bundle) if bundle else None)
        return cls(predictions=predictions, bundle_path=bundle.path, _bundle=bundle)

    # -----------------------------------------------------------------------------------------
    # Basics

    @property
    def classes(self) -> list[str]:
        """Class names."""
        return self.predictions.classes

    @property
    def multi_label(self) -> bool:
        """Whether images may carry several labels."""
        return self.predictions.multi_label

    @property
    def bundle(self):
        """The model (loaded on first use).

        Raises:
            ImgclfError: There is no bundle to load.
        """
        if self._bundle is None:
            if self.bundle_path is None:
                raise ImgclfError("this interpretation has no model bundle: build it with "
                                  "Interpretation.from_run or from_bundle to draw heatmaps")
            from imgclf.deploy.bundle import load  # lazy: torch, needed only for heatmaps

            self._bundle = load(self.bundle_path)
        return self._bundle

    def _repr_html_(self) -> str:
        """Jupyter's view: images, classes, headline numbers and the most confused pairs."""
        import html

        m = self.metrics()
        keys = (("zero_one_accuracy", "exact match"), ("hamming_accuracy", "label accuracy"),
                ("f1_macro", "macro F1")) if self.multi_label else (
            ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
            ("f1_macro", "macro F1"))
        rows = [("images", str(len(self.predictions.paths))),
                ("classes", f"{len(self.classes)} ({', '.join(self.classes[:8])}"
                            f"{', ...' if len(self.classes) > 8 else ''})")]
        rows += [(label, f"{m[k]:.4f}") for k, label in keys if isinstance(m.get(k), float)]
        if not self.multi_label:
            pairs = self.most_confused(min_count=1)[:3]
            if pairs:
                rows.append(("most confused", "; ".join(f"{a} → {p} ({n})"
                                                        for a, p, n in pairs)))
        where = f" of <code>{html.escape(str(self.run_path))}</code>" if self.run_path else ""
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}"
                        f"</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        return f"<div><b>Interpretation</b>{where}<table>{cells}</table></div>"

    def example(self, i: int) -> Example:
        """Image `i` of the predictions as an Example."""
        p = self.predictions
        return Example(index=int(i), path=p.paths[i], actual=self._labels(p.targets[i]),
                       predicted=self._labels(p.predicted[i]), loss=float(p.losses[i]),
                       probs=p.probs[i], classes=p.classes, multi_label=p.multi_label)

    def _labels(self, row) -> list[str]:
        if self.multi_label:
            return [c for c, on in zip(self.classes, np.asarray(row).astype(bool)) if on]
        return [self.classes[int(row)]]

    def metrics(self) -> dict:
        """Headline and per-class numbers (`evaluation.metrics`)."""
        return evaluation.metrics(self.predictions)

    def per_class(self) -> dict[str, dict]:
        """{class: {precision, recall, f1, support (, ap)}} at the decision rule in use."""
        return self.metrics()["per_class"]

    # -----------------------------------------------------------------------------------------
    # Confusion

    def confusion(self, normalize: bool = False, plot: bool = False):
        """Confusion matrix: rows actual, columns predicted.

        Single-label: [C, C] counts (row fractions with `normalize`). Multi-label: per class
        [C, 2, 2] as [[tn, fp], [fn, tp]]; `normalize` divides each row of those.
        """
        p = self.predictions
        if self.multi_label:
            cm = evaluation.multilabel_confusion(p)
            if normalize:
                rows = cm.sum(axis=2, keepdims=True)
                cm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
            if not plot:
                return cm
            from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

            return cm, plots.multilabel_confusion(cm, self.classes)
        cm = evaluation.confusion_normalized(p) if normalize else evaluation.confusion(p)
        if not plot:
            return cm
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return cm, plots.confusion(evaluation.confusion(p), self.classes, normalized=normalize)

    def most_confused(self, min_count: int = 1, plot: bool = False):
        """(actual, predicted, count) pairs, most frequent first (`evaluation.most_confused`)."""
        pairs = evaluation.most_confused(self.predictions, min_count=min_count)
        if not plot:
            return pairs
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        shown = pairs[:20][::-1]
        fig, ax = plots.subplots(figsize=(6, 0.3 * len(shown) + 1.2))
        ax.barh([f"{a} → {b}" for a, b, _ in shown], [n for _, _, n in shown], color="C3")
        ax.set(xlabel="images", title="Most confused pairs (actual → predicted)")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        return pairs, fig

    # -----------------------------------------------------------------------------------------
    # Galleries

    def top_losses(self, k: int = 9, plot: bool = False):
        """The `k` images with the highest loss, highest first."""
        examples = [self.example(i) for i in evaluation.top_losses(self.predictions, k)]
        return self._gallery(examples, plot)

    def confused(self, actual: str, predicted: str, k: int = 9, plot: bool = False):
        """Images of `actual` predicted wrongly, the most `predicted`-looking first.

        "The cats with the highest deer probability": see `evaluation.confused`.
        """
        idx = evaluation.confused(self.predictions, actual, predicted, k)
        return self._gallery([self.example(i) for i in idx], plot)

    def most_confident_wrong(self, k_per_class: int = 5, plot: bool = False):
        """Per class, the wrong images the model was surest about ({class: [Example]})."""
        idx = evaluation.most_confident_wrong(self.predictions, k_per_class)
        out = {c: [self.example(i) for i in rows] for c, rows in idx.items()}
        if not plot:
            return out
        _, fig = self._gallery([e for rows in out.values() for e in rows], True)
        return out, fig

    def _gallery(self, examples: list[Example], plot: bool):
        if not plot:
            return examples
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        images = [_as_array(thumbnail(e.path, 256)) for e in examples]
        fig = plots.image_grid(images, [_wrap(e.caption()) for e in examples],
                               [e.correct for e in examples])
        return examples, fig

    # -----------------------------------------------------------------------------------------
    # Curves

    def pr_curves(self, plot: bool = False):
        """Per class precision-recall curve and AP: {class: {precision, recall, thresholds, ap}}."""
        data = evaluation.pr_curves(self.predictions)
        if not plot:
            return data
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return data, plots.pr_curves(data)

    def roc_curves(self, plot: bool = False):
        """Per class ROC curve and AUC: {class: {fpr, tpr, auc}}."""
        data = evaluation.roc_curves(self.predictions)
        if not plot:
            return data
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return data, plots.roc_curves(data)

    def calibration(self, n_bins: int = 15, plot: bool = False):
        """Reliability diagram data and expected calibration error (`evaluation.calibration`)."""
        data = evaluation.calibration(self.predictions, n_bins=n_bins)
        if not plot:
            return data
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return data, plots.calibration(data, self.multi_label)

    def thresholds(self, metric: str | None = None, plot: bool = False):
        """Multi-label: the decision-threshold search (ThresholdSearch.to_dict()).

        The run's thresholds.json when there is one and `metric` is None or matches; otherwise a
        fresh search on these predictions (`evaluation.search_thresholds`).

        Raises:
            ImgclfError: Single-label predictions have no thresholds.
        """
        if not self.multi_label:
            raise ImgclfError("decision thresholds exist only for multi-label models")
        search = self.threshold_search
        if search is None or (metric is not None and metric != search.get("metric")):
            p = self.predictions
            search = evaluation.search_thresholds(p.probs, p.targets, metric=metric or "zero_one",
                                                  classes=self.classes).to_dict()
        if not plot:
            return search
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return search, plots.thresholds(search, self.classes, self.pr_curves())

    def training_curves(self, plot: bool = False):
        """metrics.csv rows (epoch, stage, lr, losses, validation metrics, seconds)."""
        if not plot:
            return self.history
        if not self.history:
            return self.history, None
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        monitor = "valid_zero_one_accuracy" if self.multi_label else "valid_accuracy"
        return self.history, plots.curves(self.history, monitor)

    def lr_find(self, plot: bool = False):
        """The learning-rate finder's curve and suggestion (None when it did not run)."""
        data = self.lr_find_data
        if not plot:
            return data
        if not data:
            return data, None
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        return data, plots.lr_find(data["lrs"], data["losses"], data["suggestion"])

    def label_issues(self) -> list[dict]:
        """Suspected label errors among these images (`evaluation.label_issues`), with paths.

        Raises:
            ImgclfError: For multi-label predictions, which the ranking does not handle.
        """
        if self.multi_label:
            raise ImgclfError("label issues are ranked for single-label data only")
        p = self.predictions
        rows = evaluation.label_issues(p.probs, p.targets, p.classes)
        return [{**r, "path": p.paths[r["index"]]} for r in rows]

    # -----------------------------------------------------------------------------------------
    # Heatmaps

    def heatmap(self, image: int | str | Path, classes: list[str | int] | None = None,
                plot: bool = False):
        """Grad-CAM heatmaps: where the model found evidence for some classes in one image.

        Args:
            image: Index into the predictions, or any image file.
            classes: Class names or indices to explain. Default for an index: the predicted
                class(es) and, where the prediction is wrong, the actual one(s); for a file, the
                most probable class.
            plot: Also return a figure: the view the model saw and one overlay per class.

        Returns:
            A list of `imgclf.report.gradcam.Heatmap`, one per class.
        """
        from imgclf.report.gradcam import heatmaps_for  # lazy: torch, only for heatmaps

        b = self.bundle
        if isinstance(image, (int, np.integer)):
            ex = self.example(int(image))
            path = ex.path
            if classes is None:
                names = list(ex.predicted) or [self.classes[int(np.argmax(ex.probs))]]
                names += [c for c in ex.actual if c not in names]
                classes = names
        else:
            path = str(image)
        idx = None if classes is None else [_class_index(b.classes, c) for c in classes]
        maps = heatmaps_for(b.model, path, b.preprocess, list(b.classes), idx, b.multi_label)
        if not plot:
            return maps
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is asked for

        images = [maps[0].view] + [m.overlay() for m in maps]
        titles = ["what the model saw"] + [f"{m.class_name} ({m.probability:.2f})" for m in maps]
        return maps, plots.image_grid(images, titles, cols=len(images), size=2.8)


def thumbnail(path: str | Path, side: int = 128):
    """The image shrunk to fit a `side` square (a PIL image), or None when it cannot be read."""
    from PIL import Image

    try:
        img = open_rgb(path)
    except (OSError, ImgclfError):
        return None
    img.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def _as_array(img) -> np.ndarray | None:
    return None if img is None else np.asarray(img)


def _wrap(text: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _class_index(classes: list[str], c: str | int) -> int:
    if isinstance(c, (int, np.integer)):
        return int(c)
    try:
        return classes.index(c)
    except ValueError:
        raise ImgclfError(f"unknown class {c!r}; the model's classes are "
                          f"{', '.join(classes[:20])}") from None


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
