"""report.html: one self-contained page per run that a person opens from disk and can trust.

Everything the page shows is embedded: plots are the PNGs written to `plots/` (so they can also
be pasted into slides), images are small JPEG thumbnails, both as base64 data URIs. There is no
script and no external resource, so the page opens without a server or network. Galleries are
capped (see the constants below and in `imgclf.report.html_extras`) so that a validation set of any size gives a page of a few
megabytes at most.

The analysis comes from `imgclf.report.interpret.Interpretation`, itself built on `imgclf.evaluation`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.io import atomic_write_text
from imgclf.report import html_extras
from imgclf.report.html_parts import (_bundle_arch, _counts_figure, _describe, _fmt, _heat,
                                      _jpeg_uri, _png_uri, _read_json, _read_yaml, _short_path,
                                      _stage_name)
from imgclf.report.interpret import Example, Interpretation, thumbnail
from imgclf.rundir import RunDir

THUMB_SIDE = 128  # gallery thumbnails (pixels, longest side)
TOP_LOSSES = 24  # the first TOP_LOSSES_OPEN are shown, the rest behind "show more"
TOP_LOSSES_OPEN = 12
WRONG_PER_CLASS = 6
WRONG_CLASSES = 24  # classes shown in the per-class gallery (most errors first) ...
WRONG_CLASSES_OPEN = 6  # ... of which these are open, the rest behind "show more"
MANY_CLASSES = 30  # from here on, tables scroll, the worst classes come first, plots stack
CONFUSION_TABLE_MAX = 12  # classes up to which the confusion matrix is also an HTML table
TEMPLATE = "template.html.j2"

log = logging.getLogger(__name__)


@dataclass
class Section:
    """One part of the page: an anchor, a title and its content for the template."""

    id: str
    title: str
    kind: str
    data: dict = field(default_factory=dict)
    note: str | None = None
    error: str | None = None


def write_report(run: RunDir | str | Path, *, heatmaps: bool = True) -> Path:
    """Write (or rewrite) `report.html` and the PNGs in `plots/` of a run.

    Args:
        run: The run (or its directory).
        heatmaps: Compute Grad-CAM heatmaps (needs the bundle; a few seconds on a CPU).

    A section that fails is shown as failed on the page and logged as a warning; the rest of
    the report is still written.

    Returns:
        The path of report.html.

    Raises:
        ImgclfError: Not a run directory, or the run has no predictions yet.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    interp = Interpretation.from_run(run.path)
    page = _Builder(run, interp, heatmaps).build()
    atomic_write_text(run.report_path, render(page))
    return run.report_path


def _fill(section: Section, title: str, fn: Callable[[Section], None]) -> None:
    """Run one section's builder; a failure is shown on the page, not raised."""
    try:
        fn(section)
    except Exception as e:  # noqa: BLE001 - one failing part must not cost the report
        section.error = f"{type(e).__name__}: {e}"
        section.data = {"traceback": traceback.format_exc(limit=-3)}
        log.warning("report: section '%s' failed: %s", title, section.error)


def render(page: dict) -> str:
    """The page dict built for a run as HTML (the Jinja2 template next to this module)."""
    from importlib.resources import files

    import jinja2

    source = files("imgclf.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(**page)


class _Builder:
    """Collects the sections of one report; each `_section_*` method fills one."""

    def __init__(self, run: RunDir, interp: Interpretation, heatmaps: bool):
        self.run, self.interp, self.want_heatmaps = run, interp, heatmaps
        self.p = interp.predictions
        self.plots_dir = run.path / "plots"
        self.metrics_json = run.metrics()
        self._thumbs: dict[tuple[str, int], str | None] = {}
        self._scores: dict | None = None
        self._curves: tuple[dict, dict] | None = None

    # -------------------------------------------------------------------------------------
    # Assembly

    def build(self) -> dict:
        ml = self.interp.multi_label
        plan = [
            ("overview", "Overview", self._section_overview),
            ("data", "Data", self._section_data),
            ("training", "Training curves", self._section_training),
            ("lr-finder", "Learning-rate finder", self._section_lr_finder),
            ("confusion", "Confusion matrix", self._section_confusion),
            ("per-class", "Per-class metrics", self._section_per_class),
            ("most-confused", "Most confused pairs", self._section_most_confused),
            ("top-losses", "Top losses", self._section_top_losses),
            ("confident-wrong", "Most confidently wrong, per class", self._section_confident_wrong),
            ("curves", "Precision-recall and ROC curves", self._section_curves),
            ("calibration", "Calibration", self._section_calibration),
        ]
        if ml:
            plan.append(("thresholds", "Decision thresholds", self._section_thresholds))
        plan.append(("heatmaps", "Where the model looked", functools.partial(html_extras.heatmaps, self)))
        if html_extras.rounds_file(self.run.path) is not None:
            plan.append(("rounds", "Hard negative mining", functools.partial(html_extras.rounds, self)))
        if (self.run.path / "label_issues.csv").is_file():
            plan.append(("label-issues", "Suspected label errors",
                         functools.partial(html_extras.label_issues, self)))
        sections = [Section(sid, title, kind=sid.replace("-", "_")) for sid, title, _ in plan]
        # The heatmaps' Grad-CAM passes run in torch, which releases the GIL, while the other
        # sections' matplotlib figures mostly hold it, so on two cores the two overlap
        # (fridgeObjects' report: 1.60 s -> 1.42 s). Their lazy imports happen here first: two
        # threads importing at once can deadlock on the import locks.
        threaded = bool(self.want_heatmaps and self.interp.bundle_path)
        if threaded:
            import imgclf.allocator  # noqa: F401  # lazy: torch, only with heatmaps
            import imgclf.deploy.bundle  # noqa: F401  # lazy: torch, only with heatmaps
            import imgclf.report.gradcam  # noqa: F401  # lazy: torch, only with heatmaps
        in_thread = [threaded and sid == "heatmaps" for sid, _, _ in plan]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            for section, (_, title, fn), alone in zip(sections, plan, in_thread):
                if alone:
                    pool.submit(_fill, section, title, fn)
            for section, (_, title, fn), alone in zip(sections, plan, in_thread):
                if not alone:
                    _fill(section, title, fn)
        return {
            "title": f"{self.run.path.name}: imgclf report",
            "run_name": self.run.path.name,
            "run_path": str(self.run.path),
            "generated": time.strftime("%Y-%m-%d %H:%M"),
            "subtitle": self._subtitle(),
            "sections": sections,
        }

    def _subtitle(self) -> str:
        m = self.metrics_json
        task = "multi-label" if self.interp.multi_label else "single-label"
        parts = [m.get("model") or _bundle_arch(self.run), f"{task}, {len(self.p.classes)} classes",
                 f"{len(self.p.paths)} validation images"]
        if m.get("train_images"):
            parts.append(f"{m['train_images']} training images")
        return " · ".join(str(x) for x in parts if x)

    def scores(self) -> dict:
        if self._scores is None:
            self._scores = self.interp.metrics()
        return self._scores

    def curves(self) -> tuple[dict, dict]:
        """Per-class PR and ROC data, computed once for the table and the plots."""
        if self._curves is None:
            self._curves = (self.interp.pr_curves(), self.interp.roc_curves())
        return self._curves

    # -------------------------------------------------------------------------------------
    # Helpers

    def plot(self, fig, name: str) -> str:
        """Save a figure as plots/<name>.png and return it as a data URI."""
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is drawn

        return _png_uri(plots.save(fig, self.plots_dir / f"{name}.png"))

    def thumb(self, path: str, side: int = THUMB_SIDE) -> str | None:
        key = (path, side)
        if key not in self._thumbs:
            img = thumbnail(path, side)
            self._thumbs[key] = None if img is None else _jpeg_uri(img)
        return self._thumbs[key]

    def card(self, ex: Example, extra: str | None = None) -> dict:
        if self.interp.multi_label:
            lines = [f"labels: {' '.join(ex.actual) or '(none)'}",
                     f"predicted: {' '.join(ex.predicted) or '(none)'}"]
        else:
            a, p = ex.actual[0], ex.predicted[0]
            lines = [f"actual: {a}", f"predicted: {p} ({ex.prob(p):.2f})"]
            if a != p:
                lines.append(f"p({a}) = {ex.prob(a):.3f}")
        lines.append(f"loss {ex.loss:.3f}")
        if extra:
            lines.insert(0, extra)
        return {"src": self.thumb(ex.path), "name": _short_path(ex.path), "path": ex.path,
                "lines": lines, "ok": ex.correct}

    # -------------------------------------------------------------------------------------
    # Sections

    def _section_overview(self, s: Section) -> None:
        scores = self.scores()
        keys = (["zero_one_accuracy", "hamming_accuracy", "f1_macro", "map", "loss"]
                if self.interp.multi_label else
                ["accuracy", "balanced_accuracy", "f1_macro", "top5_accuracy", "loss"])
        labels = {"zero_one_accuracy": "exact-match accuracy", "hamming_accuracy": "label accuracy",
                  "f1_macro": "macro F1", "map": "mean AP", "loss": "validation loss",
                  "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                  "top5_accuracy": "top-5 accuracy"}
        keys = [k for k in keys if isinstance(scores.get(k), float)]
        cards = [{"label": labels[k], "value": f"{scores[k]:.3f}"} for k in keys]
        m = self.metrics_json
        facts = []
        for key, label, fmt in (("model", "model", "{}"), ("epochs", "epochs", "{}"),
                                ("best_epoch", "best epoch", "{}"),
                                ("best_stage", "best epoch's stage", "{}"),
                                ("lr", "learning rate", "{:.2e}"),
                                ("precision", "precision", "{}"),
                                ("train_seconds", "training time", "{:.0f} s"),
                                ("images_per_second", "training throughput", "{:.0f} images/s"),
                                ("balance", "imbalance handling", "{}"),
                                ("threshold_kept", "decision thresholds", "{}")):
            if m.get(key) is not None:
                try:
                    facts.append((label, fmt.format(m[key])))
                except (ValueError, TypeError):
                    facts.append((label, str(m[key])))
        cfg = _read_yaml(self.run.path / "config.yaml")
        if cfg.get("data"):
            facts.insert(0, ("data", str(cfg["data"]) + (f" (csv {cfg['csv']})" if cfg.get("csv") else "")))
        if m.get("interrupted"):
            s.note = "Training was interrupted: these are the numbers of the best epoch finished."
        evaluation = _read_json(self.run.path / "evaluation.json")
        eval_rows = []
        if isinstance(evaluation, dict):
            eval_rows.append(("imgclf evaluate, plain view", {k: evaluation.get(k) for k in keys}))
            if isinstance(evaluation.get("tta"), dict):
                t = evaluation["tta"]
                eval_rows.append((f"with TTA ({t.get('views')} views)", {k: t.get(k) for k in keys}))
        fine_tuning = m.get("fine_tuning") if isinstance(m.get("fine_tuning"), dict) else {}
        s.data = {"cards": cards, "facts": facts,
                  "warnings": [str(w) for w in fine_tuning.get("warnings", [])],
                  "eval_keys": [labels[k] for k in keys],
                  "eval_rows": [(name, [_fmt(v.get(k)) for k in keys]) for name, v in eval_rows]}

    def _section_data(self, s: Section) -> None:
        ds = self.interp.data_summary
        if not ds:
            s.note = "No data_summary.json in the run directory."
            return
        summary, checks = ds.get("summary", {}), ds.get("checks", {})
        splits = list(summary.get("counts", {}))
        classes = summary.get("classes", [])
        rows = [[c] + [summary["counts"][sp].get(c, 0) for sp in splits] for c in classes]
        totals = [summary.get("images", {}).get(sp, "") for sp in splits]
        facts = []
        if summary.get("imbalance_ratio") is not None:
            facts.append(("largest / smallest training class",
                          f"{summary['imbalance_ratio']:g}" + (" (imbalanced)" if summary.get("imbalanced") else "")))
        if summary.get("balance_note"):
            facts.append(("imbalance handling", summary["balance_note"]))
        if summary.get("multi_label") and summary.get("empty_label_images"):
            facts.append(("images without any label", ", ".join(
                f"{sp}: {n}" for sp, n in summary["empty_label_images"].items())))
        if summary.get("groups"):
            facts.append(("groups", ", ".join(f"{sp}: {n}" for sp, n in summary["groups"].items())))
        if checks.get("checked"):
            facts.append(("files checked", str(checks["checked"])))
        details = []
        for key, value in checks.items():
            if isinstance(value, list) and value:
                details.append((key.replace("_", " "), [_describe(v) for v in value[:20]],
                                len(value)))
            elif isinstance(value, dict) and value:
                details.append((key.replace("_", " "), [f"{k}: {v}" for k, v in value.items()],
                                len(value)))
        chart = None
        if classes and splits:
            chart = self.plot(_counts_figure(classes, splits, summary["counts"]), "class_counts")
        s.data = {"splits": splits, "rows": rows, "totals": totals, "facts": facts,
                  "scroll": len(rows) > MANY_CLASSES,
                  "notes": summary.get("notes", []), "details": details, "chart": chart}

    def _section_training(self, s: Section) -> None:
        rows = self.interp.history
        if not rows:
            s.note = "No metrics.csv in the run directory."
            return
        _, fig = self.interp.training_curves(plot=True)
        cols = [c for c in rows[0] if c not in ("seconds",)]
        body = [[_fmt(r.get(c)) for c in cols] for r in rows]
        stages = []
        for r in rows:
            key = (r.get("stage"), r.get("round"))
            if not stages or stages[-1][0] != key:
                stages.append([key, r["epoch"], r["epoch"]])
            else:
                stages[-1][2] = r["epoch"]
        stage_text = "; ".join(
            f"{_stage_name(*k)}: epoch{'s' if b != a else ''} {a}{'–' + str(b) if b != a else ''}"
            for k, a, b in stages)
        best = self.metrics_json.get("best_epoch")
        s.data = {"img": self.plot(fig, "curves"), "cols": cols, "rows": body,
                  "stages": stage_text, "best": best}

    def _section_lr_finder(self, s: Section) -> None:
        data, fig = self.interp.lr_find(plot=True)
        used = self.metrics_json.get("lr")
        if not data:
            cfg = _read_yaml(self.run.path / "config.yaml")
            s.note = ("The learning-rate finder did not run: " +
                      (f"the rate was set to {cfg.get('lr')} in the configuration."
                       if cfg.get("lr") not in (None, "auto") else
                       "it runs on the frozen-body stage, which this run skipped.") +
                      (f" Peak rate used: {used:.2e}." if isinstance(used, float) else ""))
            return
        s.data = {"img": self.plot(fig, "lr_find"), "suggestion": data.get("suggestion"),
                  "rule": data.get("rule"), "on": data.get("on"), "used": used}

    def _section_confusion(self, s: Section) -> None:
        classes = self.p.classes
        if self.interp.multi_label:
            cm, fig = self.interp.confusion(plot=True)
            rows = [[c, *[int(v) for v in cm[j].ravel()]] for j, c in enumerate(classes)]
            s.data = {"multi": True, "img": self.plot(fig, "multilabel_confusion"), "rows": rows}
            return
        cm, fig = self.interp.confusion(plot=True)
        _, fig_n = self.interp.confusion(normalize=True, plot=True)
        data = {"multi": False, "img": self.plot(fig, "confusion"),
                "img_norm": self.plot(fig_n, "confusion_normalized"),
                "stack": len(classes) > MANY_CLASSES}
        if len(classes) <= CONFUSION_TABLE_MAX:
            norm = self.interp.confusion(normalize=True)
            data["table"] = {"classes": classes, "rows": [
                [(int(cm[i, j]), f"{norm[i, j]:.2f}", _heat(norm[i, j], i == j))
                 for j in range(len(classes))] for i in range(len(classes))]}
        s.data = data

    def _section_per_class(self, s: Section) -> None:
        per = self.scores()["per_class"]
        pr, roc = self.curves()
        thresholds = self.p.decision_thresholds if self.interp.multi_label else None
        cols = ["class", "precision", "recall", "F1", "support", "AP", "AUC"]
        if thresholds is not None:
            cols.insert(5, "threshold")
        rows = []
        for j, c in enumerate(self.p.classes):
            m = per[c]
            row = [c, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"])]
            if thresholds is not None:
                row.append(f"{thresholds[j]:.2f}")
            row += [_fmt(pr[c]["ap"]), _fmt(roc[c]["auc"])]
            rows.append({"cells": row, "weak": m["support"] > 0 and m["f1"] < 0.5,
                         "f1": m["f1"] if m["support"] > 0 else 2.0})
        many = len(rows) > MANY_CLASSES
        if many:
            rows.sort(key=lambda r: r["f1"])
            s.note = "Sorted by F1, the weakest classes first."
        s.data = {"cols": cols, "rows": rows, "scroll": many}
        if self.interp.multi_label:
            s.note = ((s.note + " ") if s.note else "") + (
                "Precision, recall and F1 at the decision thresholds shown; AP and AUC do not "
                "depend on them.")

    def _section_most_confused(self, s: Section) -> None:
        pairs = self.interp.most_confused(min_count=1)
        if not pairs:
            s.note = "No mix-ups: every validation image was classified correctly."
            return
        cm = None if self.interp.multi_label else self.interp.confusion()
        support = {c: int(n) for c, n in zip(self.p.classes, cm.sum(1))} if cm is not None else {}
        rows = []
        for a, b, n in pairs[:30]:
            share = f"{n / support[a]:.0%}" if support.get(a) else ""
            rows.append([a, b, n, share])
        s.data = {"rows": rows, "multi": self.interp.multi_label, "more": max(0, len(pairs) - 30)}

    def _section_top_losses(self, s: Section) -> None:
        examples = self.interp.top_losses(TOP_LOSSES)
        cards = [self.card(e, f"#{k + 1}") for k, e in enumerate(examples)]
        s.data = {"open": cards[:TOP_LOSSES_OPEN], "more": cards[TOP_LOSSES_OPEN:],
                  "total": len(self.p.paths)}

    def _section_confident_wrong(self, s: Section) -> None:
        by_class = self.interp.most_confident_wrong(WRONG_PER_CLASS)
        n_wrong = self._wrong_per_class()
        order = sorted(by_class, key=lambda c: (-n_wrong.get(c, 0), c))
        groups = []
        for c in order[:WRONG_CLASSES]:
            if not by_class[c]:
                continue
            cards = []
            for e in by_class[c]:
                extra = None
                if self.interp.multi_label:
                    j = self.p.classes.index(c)
                    extra = f"{c} {'missed' if c in e.actual else 'added'}, p = {e.probs[j]:.2f}"
                cards.append(self.card(e, extra))
            groups.append({"cls": c, "n": n_wrong.get(c, 0), "cards": cards})
        if not groups:
            s.note = "No wrong predictions in any class."
        hidden = sum(1 for c in order[WRONG_CLASSES:] if by_class[c])
        s.data = {"open": groups[:WRONG_CLASSES_OPEN], "more": groups[WRONG_CLASSES_OPEN:],
                  "hidden": hidden}

    def _wrong_per_class(self) -> dict[str, int]:
        p = self.p
        if self.interp.multi_label:
            wrong = (p.targets.astype(bool) != p.predicted).sum(0)
        else:
            wrong = np.bincount(p.targets[~p.correct], minlength=p.n_classes)
        return {c: int(n) for c, n in zip(p.classes, wrong)}

    def _section_curves(self, s: Section) -> None:
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is drawn

        pr, roc = self.curves()
        s.data = {"pr": self.plot(plots.pr_curves(pr), "pr_curves"),
                  "roc": self.plot(plots.roc_curves(roc), "roc_curves"),
                  "many": len(self.p.classes) > plots.OVERLAY_MAX,
                  "stack": len(self.p.classes) > plots.OVERLAY_MAX}

    def _section_calibration(self, s: Section) -> None:
        cal, fig = self.interp.calibration(plot=True)
        counts = np.asarray(cal["counts"])
        conf = np.asarray(cal["confidence"], dtype=float)
        acc = np.asarray(cal["accuracy"], dtype=float)
        filled = counts > 0
        over = float((counts[filled] * (conf[filled] - acc[filled])).sum() / max(counts.sum(), 1))
        verdict = ("overconfident (confidence above accuracy)" if over > 0.01 else
                   "underconfident (accuracy above confidence)" if over < -0.01 else
                   "well calibrated")
        s.data = {"img": self.plot(fig, "calibration"), "ece": cal["ece"], "verdict": verdict}

    def _section_thresholds(self, s: Section) -> None:
        from imgclf.report import plots  # lazy: matplotlib, only when a figure is drawn

        search, fig = self.interp.thresholds(plot=True)
        if self.interp.threshold_search is not None:
            # The run's own search (thresholds.json) also gets its per-class curves, kept as a
            # file beside the others for readers who want more than the page shows.
            plots.save(plots.threshold_curves(search, self.p.classes),
                       self.plots_dir / "threshold_curves.png")
        s.data = {"img": self.plot(fig, "thresholds"), "reason": search.get("reason"),
                  "metric": search.get("metric"), "kept": search.get("kept"),
                  "global": search.get("global_threshold"),
                  "fresh": self.interp.threshold_search is None}
