"""The tables of the command line, drawn from the data that the library's log records carry.

A library record with a table sets `view` (one of `RENDERERS`) and `data`; its message is the
plain-text version for other log handlers (for most views, the table's title). The console's
handler (imgclf.cli.console) calls `RENDERERS[view](console, data, message)` instead of printing
the message. Cells are rich `Text`, so file and class names never read as markup.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from imgclf.data.summary import IMBALANCED_NOTE  # torch-free, as everything imported here
from imgclf.errors import display_path


def data_summary(out: Console, summary, message: str) -> None:
    """Images per class and split (`imgclf.data.summary.DataSummary`), then what it notes."""
    splits = list(summary.counts)
    table = Table(title=summary.title(), title_justify="left")
    table.add_column("class")
    for s in splits:
        table.add_column(s, justify="right")
    for c in summary.classes:
        # Class names come from folder names, which need not be valid UTF-8.
        table.add_row(Text(display_path(c)), *(str(summary.counts[s][c]) for s in splits))
    if summary.multi_label:
        table.add_row("(no label)", *(str(summary.empty_label_images.get(s, 0)) for s in splits),
                      style="dim")
    table.add_section()
    table.add_row("images", *(str(summary.images[s]) for s in splits), style="bold")
    if summary.groups:
        table.add_row("groups", *(str(summary.groups.get(s, 0)) for s in splits))
    out.print(table)
    for line in summary.lines():
        text = Text(line)
        text.highlight_words([IMBALANCED_NOTE], "yellow")
        out.print(text)


def evaluation(out: Console, data: dict, title: str) -> None:
    """Per-class precision, recall, F1 and support (multi-label: AP and threshold too)."""
    result, multi = data["metrics"], data["multi_label"]
    table = Table(title=title)
    for col in ["class", "precision", "recall", "f1", "support"] + (
            ["ap", "threshold"] if multi else []):
        table.add_column(col, justify="left" if col == "class" else "right")
    thresholds = result.get("thresholds") or []
    for j, (c, m) in enumerate((result.get("per_class") or {}).items()):
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k))
                 for k in ["precision", "recall", "f1", "support"] + (["ap"] if multi else [])]
        if multi:
            cells.append(f"{thresholds[j]:.2f}" if j < len(thresholds) else "")
        table.add_row(Text(c), *cells)
    out.print(table)


def cv_summary(out: Console, data: dict, title: str) -> None:
    """Per-fold metrics, mean ± std and the pooled out-of-fold metrics."""
    s, names = data["summary"], data["columns"]
    table = Table(title=title, title_justify="left")
    short = {"balanced_accuracy": "balanced acc", "zero_one_accuracy": "exact match",
             "hamming_accuracy": "label acc"}
    for col in ["fold", "train", "valid", *names]:
        table.add_column(short.get(col, col), justify="left" if col == "fold" else "right",
                         no_wrap=True)

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in s["per_fold"]:
        table.add_row(str(r["fold"]), str(r["train_images"]), str(r["valid_images"]),
                      *(fmt(r.get(n)) for n in names))
    table.add_section()
    table.add_row("mean", "", "", *(fmt(s["mean"][n]) for n in names), style="bold")
    table.add_row("± std", "", "", *(fmt(s["std"].get(n)) for n in names))
    if "out_of_fold" in s:
        table.add_row("out-of-fold", "", str(s["images"]),
                      *(fmt(s["out_of_fold"].get(n)) for n in names))
    out.print(table)


def label_issues(out: Console, rows: list[dict], title: str) -> None:
    """The top suspected label errors: rank, image, given and suggested label, score."""
    table = Table(title=title, title_justify="left")
    for col in ("rank", "image", "given", "suggested", "score"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for r in rows:
        table.add_row(str(r["rank"]), Text(r["path"]), Text(r["given"]), Text(r["suggested"]),
                      f"{r['score']:.3f}")
    out.print(table)


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def mining_rounds(out: Console, data: dict, title: str) -> None:
    """Per mining round: what was mined, the held-out false-positive rate, the accuracies."""
    baseline, best_round = data["baseline"], data["best_round"]
    table = Table(title=title)
    for col in ("round", "mined", "negatives in train", "pool FP", "FP rate V",
                "positive acc", "overall acc"):
        table.add_column(col, justify="right")
    if baseline:
        table.add_row("before", "-", "0", "-", _pct(baseline["fp_rate_V"]),
                      _pct(baseline["positive_accuracy"]), _pct(baseline.get("overall_accuracy")))
    for r in data["rounds"]:
        scored = r.get("pool_scored")
        fp = "-" if scored is None else f"{r['pool_false_positives']}/{scored}"
        mark = " *" if r["round"] == best_round else ""
        table.add_row(f"{r['round']}{mark}", str(r["n_mined"]), str(r["n_train_negatives"]), fp,
                      _pct(r["fp_rate_V"]), _pct(r["positive_accuracy"]),
                      _pct(r["overall_accuracy"]))
    out.print(table)


def runs(out: Console, rows: list[dict], title: str) -> None:
    """`imgclf runs`: one line per run directory (`imgclf.commands.runs.run_row`)."""
    table = Table(title=title, title_justify="left")
    for col, justify in (("run", "left"), ("data", "left"), ("model", "left"),
                         ("recipe", "left"), ("score", "right"), ("time", "right"),
                         ("finished", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.4f}"
        if r["score"] is not None and r["metric"] != "accuracy":
            score += f" ({r['metric']})"
        seconds = r.get("seconds")
        table.add_row(Text(r["run"]), Text(r["data"]), Text(str(r["model"])), Text(r["recipe"]),
                      score, "-" if seconds is None else f"{seconds:.0f} s",
                      r["finished"] or Text(r["status"], style="yellow"),
                      style="dim" if r["status"] != "finished" else None)
    out.print(table)


def rule(out: Console, data, title: str) -> None:
    """A horizontal rule with a title (between the folds of a cross-validation)."""
    out.rule(Text(title))


RENDERERS = {"data_summary": data_summary, "evaluation": evaluation, "cv_summary": cv_summary,
             "label_issues": label_issues, "mining_rounds": mining_rounds, "rule": rule}


def cache_info(out: Console, info) -> None:
    """What the decode cache holds (`imgclf.data.cache.CacheInfo`), per presize setting."""
    table = Table(title=f"Decode cache: {display_path(info.location)}", title_justify="left")
    for name in ("presize setting", "images", "size"):
        table.add_column(name, justify="left" if name == "presize setting" else "right")
    for f in info.folders:
        table.add_row(Text(f.name), str(f.entries), _gb(f.bytes))
    table.add_section()
    table.add_row("index", f"{info.index_files} files", _gb(info.index_bytes))
    table.add_row("total", str(info.entries), _gb(info.bytes), style="bold")
    out.print(table)
    if info.max_bytes:
        out.print(f"cap: {_gb(info.max_bytes)} (default: 20 GB or a quarter of the disk space, "
                  "whichever is less; --cache-max-gb sets it per run)", highlight=False)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
