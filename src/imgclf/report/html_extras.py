"""The sections of report.html that read more than the predictions: heatmaps (the bundle), hard
negative mining (rounds.json) and suspected label errors (label_issues.csv).

Split from `imgclf.report.html`; each function fills one `Section` using the page's builder `b`
(its interpretation, thumbnails and plots).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from imgclf.errors import ImgclfError
from imgclf.report.html_parts import (_confident_right, _explained, _fmt, _image_entries,
                                      _jpeg_uri, _png_uri, _read_json,
                                      _resize, _role, _short_path)

HEATMAP_SIDE = 168  # heatmap panels
HEATMAPS_WRONG = 6
HEATMAPS_RIGHT = 6
LABEL_ISSUES = 24
ROUND_IMAGES = 12


def heatmaps(b, s) -> None:
    if not b.want_heatmaps:
        s.note = "Heatmaps were not requested (--no-heatmaps)."
        return
    if b.interp.bundle_path is None:
        s.note = "The run has no model bundle, so there are no heatmaps."
        return
    from imgclf.allocator import one_thread  # lazy: imports torch

    with one_thread():  # single-image passes, too small to share between threads
        _heatmaps(b, s)


def _heatmaps(b, s) -> None:
    p = b.p
    wrong = [i for i in np.argsort(-p.losses, kind="stable") if not p.correct[i]][:HEATMAPS_WRONG]
    right = _confident_right(p, HEATMAPS_RIGHT)
    groups = []
    right_title = ("Correct predictions (the most confident)" if p.multi_label else
                   "Correct predictions (the most confident of each class)")
    unreadable = []
    for title, idx in (("Top losses (wrong predictions)", wrong), (right_title, right)):
        items = []
        for i in idx:
            ex = b.interp.example(int(i))
            try:
                maps = b.interp.heatmap(int(i), classes=_explained(ex)[:3])
            except (ImgclfError, OSError) as e:
                unreadable.append(f"{_short_path(ex.path)} ({e})")
                continue
            panels = [{"src": _jpeg_uri(_resize(maps[0].view, HEATMAP_SIDE)),
                       "label": "what the model saw"}]
            for m in maps:
                panels.append({"src": _jpeg_uri(_resize(m.overlay(), HEATMAP_SIDE)),
                               "label": f"{_role(ex, m.class_name)}: {m.class_name} "
                                        f"({m.probability:.2f})"})
            items.append({"name": _short_path(ex.path), "path": ex.path, "ok": ex.correct,
                          "caption": ex.caption(), "panels": panels})
        if items:
            groups.append({"title": title, "entries": items})
    if unreadable:
        s.note = (f"{len(unreadable)} images could not be read, so have no heatmap: "
                  + "; ".join(unreadable[:3]) + (" …" if len(unreadable) > 3 else ""))
    elif not groups:
        s.note = "No validation images to explain."
    s.data = {"groups": groups}


def rounds(b, s) -> None:
    from imgclf.report import plots  # lazy: matplotlib, only when a figure is drawn

    path = rounds_file(b.run.path)
    raw = _read_json(path)
    rows = raw.get("rounds", []) if isinstance(raw, dict) else raw
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    facts = []
    if isinstance(raw, dict):
        facts = [(k.replace("_", " "), _fmt(v)) for k, v in raw.items()
                 if k != "rounds" and v is not None and not isinstance(v, (list, dict))]
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (list, dict))]
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    baseline = raw.get("baseline") if isinstance(raw, dict) else None
    if cols and isinstance(baseline, dict):
        table.insert(0, ["before" if c == "round" else _fmt(baseline.get(c)) for c in cols])
    keys = ("round", "fp_rate_V", "positive_accuracy", "overall_accuracy")
    chart = None
    if rows and all(k in r for r in rows for k in keys):
        chart = b.plot(plots.mining_rounds(rows, baseline), "mining")
    elif (b.plots_dir / "mining.png").is_file():  # a run mined before the report drew it
        chart = _png_uri(b.plots_dir / "mining.png")
    galleries = []
    for n, r in enumerate(rows):
        for key, value in r.items():
            images = _image_entries(value)
            if not images:
                continue
            cards = [{"src": b.thumb(pth), "name": _short_path(pth), "path": pth,
                      "lines": lines, "ok": False} for pth, lines in images[:ROUND_IMAGES]]
            galleries.append({"title": f"Round {r.get('round', n)}: {key.replace('_', ' ')}",
                              "cards": cards, "more": max(0, len(images) - ROUND_IMAGES)})
    s.data = {"facts": facts, "cols": cols, "rows": table, "chart": chart,
              "galleries": galleries, "source": str(path.relative_to(b.run.path))}
    if not rows:
        s.note = f"{path.name} lists no finished rounds."


def rounds_file(run_path: Path) -> Path | None:
    """rounds.json of hard negative mining, in the run or its mining/ folder."""
    for p in (run_path / "rounds.json", run_path / "mining" / "rounds.json"):
        if p.is_file():
            return p
    return None


def label_issues(b, s) -> None:
    with open(b.run.path / "label_issues.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cards = []
    for r in rows[:LABEL_ISSUES]:
        path = r.get("path") or ""
        if not path and r.get("index", "").isdigit() and int(r["index"]) < len(b.p.paths):
            path = b.p.paths[int(r["index"])]
        lines = [f"given: {r.get('given', '?')}", f"suggested: {r.get('suggested', '?')}"]
        if r.get("score"):
            lines.append(f"score {float(r['score']):.3f}")
        cards.append({"src": b.thumb(path) if path else None, "name": _short_path(path),
                      "path": path, "lines": lines, "ok": False})
    s.data = {"cards": cards, "total": len(rows)}
    if not rows:
        s.note = "label_issues.csv lists no suspects."
