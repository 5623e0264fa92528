"""compare.html: several runs on one self-contained page (`imgclf compare RUN RUN...`).

The page shows each run's summary row (from `imgclf.commands.runs`), their per-epoch curves
overlaid (validation score, validation loss, training loss; matplotlib PNGs embedded as base64,
as report.html embeds its plots) and the settings in which their config.yaml files differ. No
script and no external resource: it opens from disk.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from imgclf.io import atomic_write_text
from imgclf.report.plots import subplots
from imgclf.rundir import RunDir

# Settings that name the run rather than describe how it was trained.
_NOT_SETTINGS = {"name", "out"}

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imgclf: {{ runs|length }} runs compared</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px;
          margin-right: 0.4em; vertical-align: -0.1em; }
img { max-width: 100%; } .dim { color: #777; } code { font-size: 13px; }
</style></head><body>
<h1>{{ runs|length }} runs compared</h1>
<h2>Runs</h2>
<table><tr><th>run</th><th>data</th><th>model</th><th>recipe</th><th>{{ metric }}</th>
<th>train time</th><th>finished</th></tr>
{% for r in runs %}<tr><td><span class="swatch" style="background: {{ r.color }}"></span>
<code>{{ r.label }}</code><div class="dim">{{ r.path }}</div></td><td>{{ r.data }}</td>
<td>{{ r.model }}</td><td>{{ r.recipe }}</td><td class="num">{{ r.score_text }}</td>
<td class="num">{{ r.time_text }}</td><td>{{ r.finished or r.status }}</td></tr>
{% endfor %}</table>
<h2>Curves</h2>
{% if curves %}<img alt="validation curves of the runs, overlaid" src="{{ curves }}">
<p class="dim">x: epoch as numbered in each run's metrics.csv (frozen stage, then the whole
network{{ ", then mining rounds" if mined else "" }}).</p>
{% else %}<p>No run has a metrics.csv yet.</p>{% endif %}
<h2>Settings that differ</h2>
{% if differ %}<table><tr><th>setting</th>{% for r in runs %}<th><code>{{ r.label }}</code></th>
{% endfor %}</tr>
{% for name, values in differ %}<tr><td><code>{{ name }}</code></td>{% for v in values %}
<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>None: every setting is the same (the runs differ only in name).</p>{% endif %}
<details><summary>{{ same|length }} settings the same in every run</summary>
<table>{% for name, v in same %}<tr><td><code>{{ name }}</code></td><td>{{ v }}</td></tr>
{% endfor %}</table></details>
</body></html>
"""


def _show(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def config_differences(configs: list[dict]) -> tuple[list[tuple[str, list[str]]],
                                                     list[tuple[str, str]]]:
    """(setting, value per run) where the runs' settings differ, and (setting, value) where
    they agree; the run's name and output folder are left out."""
    names: list[str] = []
    for c in configs:
        names += [k for k in c if k not in names and k not in _NOT_SETTINGS]
    differ, same = [], []
    for k in names:
        values = [_show(c.get(k)) for c in configs]
        if len(set(values)) > 1:
            differ.append((k, values))
        else:
            same.append((k, values[0]))
    return differ, same


def _metric_key(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    for k in ("valid_accuracy", "valid_zero_one_accuracy"):
        if k in first:
            return k
    return next((k for k in first if k.startswith("valid_") and k != "valid_loss"), "valid_loss")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def curves_figure(histories: list[list[dict]], labels: list[str], colors: list[str]):
    """Validation score, validation loss and training loss per epoch, one line per run."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = subplots(1, 3, figsize=(14, 3.8))
    keys = {_metric_key(rows) for rows in histories if rows}
    score = keys.pop().removeprefix("valid_").replace("_", " ") if len(keys) == 1 else "score"
    titles = (f"Validation {score}", "Validation loss", "Training loss")
    for rows, label, color in zip(histories, labels, colors):
        if not rows:
            continue
        x = [r.get("epoch") for r in rows]
        key = _metric_key(rows)
        for ax, k in zip(axes, (key, "valid_loss", "train_loss")):
            ax.plot(x, [_num(r.get(k)) for r in rows], "o-", ms=3, lw=1.6, color=color,
                    label=label)
        # Where each run's stages change (frozen -> unfrozen -> mining), a faint tick.
        for prev, row in zip(rows, rows[1:]):
            if row.get("stage") != prev.get("stage"):
                for ax in axes:
                    ax.axvline(row["epoch"] - 0.5, color=color, ls=":", lw=0.8, alpha=0.6)
    for ax, title in zip(axes, titles):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_comparison(runs: list[RunDir], rows: list[dict], configs: list[dict],
                     out: Path) -> Path:
    """Write the comparison page.

    Args:
        runs: The run directories, in the page's order.
        rows: Their summary rows (`imgclf.commands.runs.run_row`), with a unique `label`.
        configs: Their settings (config.yaml as a dict; {} when unreadable).
        out: The HTML file to write.

    Returns:
        `out`.
    """
    import jinja2  # lazy: only the report pages need it

    colors = [f"C{i % 10}" for i in range(len(runs))]
    hex_colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"]
    histories = [r.history() for r in runs]
    labels = [row["label"] for row in rows]
    curves = (_png_uri(curves_figure(histories, labels, colors))
              if any(histories) else None)
    differ, same = config_differences(configs)
    metrics = {row["metric"] for row in rows}
    shown = []
    for i, row in enumerate(rows):
        seconds = row.get("seconds")
        shown.append({**row, "color": hex_colors[i % 10],
                      "score_text": "–" if row["score"] is None else f"{row['score']:.4f}",
                      "time_text": "–" if seconds is None else f"{seconds:.1f} s"})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    html = env.from_string(_TEMPLATE).render(
        runs=shown, curves=curves, differ=differ, same=same,
        metric=" / ".join(sorted(metrics)) or "accuracy",
        mined=any(str(r.get("stage", "")).startswith("mining") for h in histories for r in h))
    out = Path(out)
    atomic_write_text(out, html)
    return out
