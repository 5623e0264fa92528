"""Small pieces of report.html: cells, captions, data URIs, thumbnails and the class-count figure.

Split from `imgclf.report.html`, whose `_Builder` assembles the page from them.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.report import plots
from imgclf.report.interpret import Example
from imgclf.rundir import RunDir


def _explained(ex: Example) -> list[str]:
    """Classes a heatmap explains: the predicted ones (most probable first), then the actual
    ones the model missed."""
    predicted = sorted(ex.predicted, key=lambda c: -ex.prob(c)) or [
        ex.classes[int(np.argmax(ex.probs))]]
    return predicted + [c for c in ex.actual if c not in predicted]


def _role(ex: Example, name: str) -> str:
    if not ex.multi_label:
        return "predicted" if name in ex.predicted else "actual"
    if name in ex.predicted:
        return "predicted" if name in ex.actual else "predicted, not labelled"
    return "labelled, missed" if name in ex.actual else "most probable"


def _stage_name(stage, rnd) -> str:
    """A stage as in metrics.csv, with its mining round unless the name already says it."""
    if rnd in (None, "") or "round" in str(stage):
        return str(stage)
    return f"{stage} (round {rnd})"


def _confident_right(p, k: int) -> list[int]:
    """Up to k correct images: the most confident of each class in turn."""
    correct = np.flatnonzero(p.correct)
    if not correct.size:
        return []
    conf = p.probs.max(axis=1)
    if p.multi_label:
        order = correct[np.argsort(-conf[correct], kind="stable")]
        return order[:k].tolist()
    picked = []
    for j in range(p.n_classes):
        mine = correct[p.targets[correct] == j]
        if mine.size:
            picked.append(int(mine[np.argmax(conf[mine])]))
    picked.sort(key=lambda i: -conf[i])
    return picked[:k]


def _counts_figure(classes: list[str], splits: list[str], counts: dict):
    shown = classes[:60]
    fig, ax = plots.subplots(figsize=(min(12, 2 + 0.28 * len(shown) * max(1, len(splits)) ** 0.5), 3.2))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(shown))
    for k, sp in enumerate(splits):
        ax.bar(x + (k - (len(splits) - 1) / 2) * width, [counts[sp].get(c, 0) for c in shown],
               width=width, label=sp)
    ax.set_xticks(x, shown, rotation=90 if len(shown) > 8 else 0, fontsize=8)
    ax.set(ylabel="images", title="Images per class" +
           (f" (first {len(shown)} of {len(classes)} classes)" if len(shown) < len(classes) else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _resize(arr: np.ndarray, side: int):
    from PIL import Image

    img = Image.fromarray(arr)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img


def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=82, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short_path(path: str, keep: int = 2) -> str:
    parts = Path(path).parts
    return "/".join(parts[-keep:]) if parts else ""


def _heat(v: float, diagonal: bool) -> str:
    """Background of a row-normalised confusion cell: blue on the diagonal, red off it.

    The opacity stops at 0.45 so that the dark text stays readable on every cell.
    """
    alpha = 0.06 + 0.39 * v if v > 0 else 0.0
    rgb = "37, 99, 235" if diagonal else "220, 38, 38"
    return f"rgba({rgb}, {alpha:.2f})"


def _fmt(v) -> str:
    """A table cell: floats to 3 decimals (or 3 significant digits when tiny), NaN/None as a dash."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-2 else f"{v:.3f}"
    return str(v)


def _describe(v) -> str:
    if isinstance(v, dict):
        parts = []
        for k, x in v.items():
            if k == "digest":
                continue
            if isinstance(x, list):
                x = ", ".join("/".join(i) if isinstance(i, list) else str(i) for i in x[:6]) + (
                    " …" if len(x) > 6 else "")
            parts.append(f"{k}: {x}")
        return "; ".join(parts)
    return str(v)


def _image_entries(value) -> list[tuple[str, list[str]]]:
    """Image files listed in a JSON value (paths, or dicts with a "path"), with the dicts'
    other scalar fields as caption lines."""
    out = []
    for item in value if isinstance(value, list) else []:
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        lines = [f"{k}: {_fmt(v)}" for k, v in item.items()
                 if k != "path" and not isinstance(v, (list, dict))] if isinstance(item, dict) else []
        out.append((path, lines))
    return out


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _bundle_arch(run: RunDir) -> str | None:
    meta = _read_json(run.bundle_path / "model.json")
    return meta.get("arch") if isinstance(meta, dict) else None


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
