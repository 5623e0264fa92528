"""What `imgclf review` shows and records: the queues of a run or cross-validation, and decisions.

A `ReviewSession` reads a finished run directory (its validation predictions.csv) or a
cross-validation folder (oof_predictions.csv: every image, scored by the fold that never trained
on it) and builds the queues a person works through:

    label_issues     suspected label errors, ranked as `imgclf label-issues` ranks them
                     (single-label: another class more probable than the given one, by margin)
    top_losses       the highest-loss images
    confident_wrong  per class, the wrong images the model was most sure of
    mined            after `imgclf mine`: the pool images mined as hard negatives

Each item carries its given and predicted labels with probabilities and its duplicates and
near-duplicates (from the data checks in data_summary.json). Decisions (keep, relabel, exclude,
negative) are written at once, atomically, to `<folder>/corrections.csv`, which
`imgclf train --corrections` applies (see `imgclf.data.corrections`); they are read back when a
session starts, so a reload or a restart loses nothing. The user's data is only read.

The web page (server.py) calls exactly these methods; so can a script:

    s = ReviewSession("runs/cv-photos")
    for item in s.queue("label_issues")[:20]:
        s.decide(item["path"], "relabel", [item["suggested"]])
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from imgclf import evaluation
from imgclf.commands.cv import CV_CONFIG, OOF, read_oof
from imgclf.config import TrainConfig
from imgclf.data.corrections import (ACTIONS, FILENAME, NEGATIVE_LABEL, Correction, now,
                                     read_corrections, write_corrections)
from imgclf.errors import ImgclfError, display_path
from imgclf.report.interpret import Interpretation
from imgclf.data.samples import relative_to_root
from imgclf.rundir import read_json

log = logging.getLogger(__name__)

QUEUES = {
    "label_issues": ("Suspected label errors",
                     "Another class is more probable than the given label; largest margin first."),
    "top_losses": ("Top losses", "The images the model got most wrong, by loss."),
    "confident_wrong": ("Confidently wrong", "Per class, the mistakes the model was surest of."),
    "mined": ("Mined negatives", "Pool images `imgclf mine` trained on as negatives."),
}
# Probabilities shown per item (plus the given labels').
TOP_PROBS = 5


class ReviewSession:
    """The queues and decisions of one run directory or cross-validation folder.

    Args:
        target: A finished run directory or a cross-validation folder.
        limit: Most items per queue.
        per_class: Items per class in the confident_wrong queue.

    Raises:
        ImgclfError: `target` is neither, has no predictions yet, or its corrections.csv is
            damaged (the message lists the lines).
    """

    def __init__(self, target: str | Path, limit: int = 500, per_class: int = 10):
        self.folder = Path(target)
        self._lock = threading.Lock()
        self._cam_lock = threading.Lock()
        self.limit, self.per_class = limit, per_class
        if (self.folder / CV_CONFIG).is_file() and (self.folder / OOF).is_file():
            self.kind = "cv"
            self.cfg = TrainConfig.from_yaml(self.folder / CV_CONFIG)
            preds, folds = read_oof(self.folder / OOF)
            summary = _read_json(self.folder / "cv_summary.json") or {}
            if summary.get("task") == "multi_label" and not preds.multi_label:
                preds = evaluation.Predictions.from_csv(self.folder / OOF, multi_label=True)
            self.preds, self.folds = preds, folds
            summaries = sorted(self.folder.glob("fold-*/data_summary.json"))
        elif (self.folder / "config.yaml").is_file() and (self.folder / "predictions.csv").is_file():
            self.kind = "run"
            self.cfg = TrainConfig.from_yaml(self.folder / "config.yaml")
            self.preds, self.folds = Interpretation.from_run(self.folder).predictions, None
            summaries = [self.folder / "data_summary.json"]
        else:
            raise ImgclfError(f"{self.folder}: neither a finished run (config.yaml and "
                              f"predictions.csv) nor a cross-validation folder ({CV_CONFIG} and "
                              f"{OOF}): pass what `imgclf train` or `imgclf cv` wrote")
        self.classes = list(self.preds.classes)
        self.multi_label = bool(self.preds.multi_label)
        self.manifest = _read_json(self.folder / "mining" / "manifest.json")
        pool = _read_json(self.folder / "mining" / "pool.json") or {}
        self.pool_paths = {str(p) for p in [*pool.get("mining", []), *pool.get("valid", [])]}
        self.negative_label = None if self.multi_label else (
            (self.manifest or {}).get("options", {}).get("negative_label") or NEGATIVE_LABEL)
        self.root = _data_root(self.cfg)
        self.items: dict[str, dict] = {}
        self.queues: dict[str, list[str]] = {}
        self._build_items()
        self._build_queues()
        self.duplicates = self._duplicates(summaries)
        for path, dups in self.duplicates.items():
            if path in self.items:
                self.items[path]["duplicates"] = dups
        # Images that may be served: those of the tables, never a path a request makes up.
        self.images: dict[str, Path] = {p: Path(p) for p in self.items}
        for dups in self.duplicates.values():
            self.images.update({d["path"]: Path(d["path"]) for d in dups})
        self.corrections_path = self.folder / FILENAME
        self.decisions: dict[str, Correction] = {}
        if self.corrections_path.is_file():
            self.decisions = {c.path: c for c in read_corrections(self.corrections_path)}
        self._history: list[tuple[str, Correction | None]] = []
        self._models: dict = {}

    # -----------------------------------------------------------------------------------------
    # Items and queues

    def _build_items(self) -> None:
        p = self.preds
        probs = p.probs
        predicted = p.predicted
        losses = p.losses
        for i, path in enumerate(p.paths):
            if self.multi_label:
                given = [c for c, y in zip(self.classes, p.targets[i]) if y]
                pred = [c for c, y in zip(self.classes, predicted[i]) if y]
            else:
                given, pred = [self.classes[p.targets[i]]], [self.classes[predicted[i]]]
            self.items[path] = self._item(path, given, pred, probs[i], float(losses[i]),
                                          None if self.folds is None else self.folds[i])

    def _item(self, path: str, given: list[str], predicted: list[str], row, loss, fold) -> dict:
        order = [int(j) for j in np.argsort(-np.asarray(row), kind="stable")[:TOP_PROBS]]
        shown = order + [self.classes.index(g) for g in given
                         if g in self.classes and self.classes.index(g) not in order]
        return {"path": path, "name": Path(path).name, "rel": self._rel(path), "given": given,
                "predicted": predicted, "loss": loss, "fold": fold,
                "probs": [[self.classes[j], float(row[j])] for j in shown],
                "source": "pool" if path in self.pool_paths else "data", "duplicates": []}

    def _rel(self, path: str) -> str:
        return relative_to_root(path, self.root)

    def _build_queues(self) -> None:
        p, limit = self.preds, self.limit
        if not self.multi_label:
            ranked = evaluation.rank_label_issues(p)[:limit]
            for r in ranked:
                self.items[p.paths[r["index"]]].update(
                    suggested=r["suggested"], score=float(r["score"]),
                    confident=bool(r["confident"]))
            self.queues["label_issues"] = [p.paths[r["index"]] for r in ranked]
        self.queues["top_losses"] = [p.paths[i] for i in evaluation.top_losses(p, limit)]
        wrong = evaluation.most_confident_wrong(p, k_per_class=self.per_class)
        self.queues["confident_wrong"] = [p.paths[i] for c in self.classes for i in wrong[c]]
        for c in self.classes:
            for i in wrong[c]:
                self.items[p.paths[i]].setdefault("group", c)
        mined = self._mined()
        if mined:
            self.queues["mined"] = mined

    def _mined(self) -> list[str]:
        """Paths mined as negatives, by round, with what the model called them then."""
        out = []
        for r in (self.manifest or {}).get("rounds", []):
            for pick in r.get("mined", []):
                path = str(pick["path"])
                if path not in self.items:
                    row = np.zeros(len(self.classes))
                    if pick.get("predicted") in self.classes:
                        row[self.classes.index(pick["predicted"])] = float(pick.get("confidence", 0))
                    given = [] if self.multi_label else [self.negative_label]
                    pred = pick.get("predicted")  # None: marked negative in a review
                    self.items[path] = self._item(path, given, [pred] if pred else [],
                                                  row, None, None)
                    self.items[path]["source"] = ("data" if pick.get("source") == "corrections"
                                                  else "pool")
                    self.items[path]["round"] = r.get("round")
                out.append(path)
        return out[: self.limit]

    def queue(self, name: str) -> list[dict]:
        """The items of a queue, in order (label_issues: best suspect first, with `suggested`)."""
        if name not in QUEUES:
            raise ImgclfError(f"no queue {name!r}: the queues are {', '.join(QUEUES)}")
        return [self.items[p] for p in self.queues.get(name, [])]

    def _duplicates(self, summaries: list[Path]) -> dict[str, list[dict]]:
        """Identical and nearly identical files per image, from the data checks."""
        out: dict[str, dict[str, dict]] = {}

        def link(a: str, b: str, kind: str, distance: int | None) -> None:
            pa, pb = self._resolve(a), self._resolve(b)
            if pa is None or pb is None or pa == pb:
                return
            for x, y in ((pa, pb), (pb, pa)):
                out.setdefault(x, {}).setdefault(y, {"path": y, "rel": self._rel(y),
                                                     "kind": kind, "distance": distance})

        for path in summaries:
            checks = (_read_json(path) or {}).get("checks") or {}
            for group in [*checks.get("leakage", []), *checks.get("duplicates", [])]:
                files = group.get("files", [])
                for a in files:
                    for b in files:
                        link(a, b, "identical", 0)
            for near in checks.get("near_duplicates", []):
                link(near["train"], near["other"], "near", near.get("distance"))
        return {k: sorted(v.values(), key=lambda d: (d["distance"] or 0, d["path"]))
                for k, v in out.items()}

    def _resolve(self, shown: str) -> str | None:
        """An absolute path for a file named as the checks show it (relative to the data)."""
        p = Path(shown)
        if not p.is_absolute():
            if self.root is None:
                return None
            p = self.root / p
        p = Path(os.path.normpath(p))
        return str(p) if p.is_file() else None

    # -----------------------------------------------------------------------------------------
    # Decisions

    def decide(self, path: str, action: str, labels: list[str] | None = None) -> dict:
        """Record a decision about an image, at once, in corrections.csv.

        Args:
            path: An image of the queues (as `item["path"]`).
            action: keep | relabel | exclude | negative.
            labels: For relabel: the new class (single-label: exactly one; multi-label: the
                whole new set, possibly empty).

        Returns:
            The decision as the page shows it.

        Raises:
            ImgclfError: Unknown image, action or class.
        """
        item = self.items.get(path)
        if item is None:
            raise ImgclfError(f"'{display_path(path)}' is not an image of this review")
        if action not in ACTIONS:
            raise ImgclfError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
        labels = [str(x) for x in labels or []]
        if action == "relabel":
            unknown = [x for x in labels if x not in self.classes]
            if unknown:
                raise ImgclfError(f"{', '.join(map(repr, unknown))} is not a class: the classes "
                                  f"are {', '.join(self.classes)}")
            if not self.multi_label and len(labels) != 1:
                raise ImgclfError("relabel takes exactly one class for single-label data")
            if any(" " in x for x in labels) and self.multi_label:
                raise ImgclfError("multi-label class names cannot hold spaces")
            cell = " ".join(sorted(set(labels))) if self.multi_label else labels[0]
        elif action == "negative":
            cell = "" if self.multi_label else self.negative_label
        else:
            cell = ""
        c = Correction(path, action, cell, now(), item["source"])
        with self._lock:
            self._history.append((path, self.decisions.get(path)))
            self.decisions[path] = c
            self._save()
        return self.decision(path)

    def undo(self) -> dict:
        """Take back the last decision of this session (the one before it is restored).

        Returns:
            {"path": the image (None when there is nothing to undo), "decision": what it is now}.
        """
        with self._lock:
            if not self._history:
                return {"path": None, "decision": None}
            path, before = self._history.pop()
            if before is None:
                self.decisions.pop(path, None)
            else:
                self.decisions[path] = before
            self._save()
        return {"path": path, "decision": self.decision(path)}

    def _save(self) -> None:
        write_corrections(self.corrections_path, list(self.decisions.values()))

    def decision(self, path: str) -> dict | None:
        """The current decision about an image, as plain data (None: undecided)."""
        c = self.decisions.get(path)
        if c is None:
            return None
        return {"action": c.action, "labels": c.label_list(self.multi_label), "time": c.time}

    def counts(self) -> dict:
        """Decisions per action, and in all."""
        n = Counter(c.action for c in self.decisions.values())
        return {**{a: n[a] for a in ACTIONS}, "total": sum(n.values()),
                "can_undo": bool(self._history)}

    # -----------------------------------------------------------------------------------------
    # What the page reads

    def state(self) -> dict:
        """Everything the page shows: queues, items, decisions and counts."""
        shown = {p for paths in self.queues.values() for p in paths}
        return {
            "title": self.folder.name, "folder": str(self.folder), "kind": self.kind,
            "classes": self.classes, "multi_label": self.multi_label,
            "negative_label": self.negative_label, "corrections": str(self.corrections_path),
            "heatmaps": self.heatmaps_available(),
            "queues": [{"name": n, "title": QUEUES[n][0], "description": QUEUES[n][1],
                        "paths": self.queues[n]} for n in QUEUES if n in self.queues],
            "items": {p: self.items[p] for p in shown},
            "decisions": {p: self.decision(p) for p in self.decisions},
            "counts": self.counts(),
        }

    def image_file(self, path: str) -> Path:
        """The file of an image the tables name.

        Raises:
            KeyError: Any other path (no file outside the review's tables is ever served).
        """
        return self.images[path]

    def heatmaps_available(self) -> bool:
        if self.kind == "cv":
            return (self.folder / "fold-0" / "model" / "model.json").is_file()
        return (self.folder / "model" / "model.json").is_file()

    def heatmap_png(self, path: str, label: str | None = None) -> bytes:
        """Grad-CAM of `label` (default: the predicted class) over the image's evaluation view,
        by the model that scored it (in a cross-validation: its fold's), as PNG bytes.

        Raises:
            KeyError: Not an image of the review.
            ImgclfError: No model, or `label` is not one of its classes.
        """
        import io

        from PIL import Image

        from imgclf.report.gradcam import heatmaps_for  # lazy: torch, for a heatmap asked for

        item = self.items[path]
        folder = self.folder if item.get("fold") is None else self.folder / f"fold-{item['fold']}"
        bundle = self._bundle(folder)
        label = label or (item["predicted"][0] if item["predicted"] else bundle.classes[0])
        if label not in bundle.classes:
            raise ImgclfError(f"{label!r} is not a class of the model")
        with self._cam_lock:  # one Grad-CAM at a time: each uses every core
            (hm,) = heatmaps_for(bundle.model, self.images[path], bundle.preprocess,
                                 bundle.classes, [bundle.classes.index(label)],
                                 bundle.multi_label)
        buf = io.BytesIO()
        Image.fromarray(hm.overlay()).save(buf, format="PNG")
        return buf.getvalue()

    def _bundle(self, folder: Path):
        from imgclf.deploy.bundle import load as load_bundle  # lazy: torch, once a model is needed

        if folder not in self._models:
            if not (folder / "model" / "model.json").is_file():
                raise ImgclfError(f"{folder} has no model: heatmaps need the trained bundle")
            self._models[folder] = load_bundle(folder)
        return self._models[folder]


def _data_root(cfg: TrainConfig) -> Path | None:
    if not cfg.data:
        return None
    root = Path(os.path.abspath(cfg.data))
    return root.parent if root.is_file() else root


def _read_json(path: Path) -> dict | None:
    return read_json(path)
