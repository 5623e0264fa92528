"""Suspected label errors: rank images whose given label the model doubts, and write them down.

Out-of-sample probabilities are ranked: a cross-validation's out-of-fold predictions (every
image, each scored by the model that never trained on it), or a run's validation predictions.
An image is a suspect when another class is more probable than its given label; suspects are
ranked by the margin probs[suggested] - probs[given] (how much more the model believes the
suggested class). The `confident` column marks the images the stricter confident-learning rule
of `evaluation.label_issues` also flags (the other class reaches that class's average
self-confidence). That rule alone, or ranking its finds first, missed flipped labels whose
true class the model recognised with ordinary rather than typical confidence: on the benchmark
(benchmarks/imbalance_and_label_errors.py) the margin ranking found 25 of 28 flips in its
top 28, the confident-learning-first order 24. The ranking itself (pure numpy) is
`imgclf.evaluation.rank_label_issues`; this command reads the predictions and writes the file.

The result is `label_issues.csv` in the same folder (rank, path, given, suggested, score,
given_prob, suggested_prob, confident and, for cross-validation, fold), which the run report
shows as a gallery. Nothing is relabelled: the file is a list to review.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from imgclf import evaluation
from imgclf.commands import train as train_cmd
from imgclf.commands.cv import OOF
from imgclf.errors import ImgclfError
from imgclf.evaluation import rank_label_issues
from imgclf.io import atomic_write_text

log = logging.getLogger(__name__)

FILENAME = "label_issues.csv"
COLUMNS = ("rank", "path", "given", "suggested", "score", "given_prob", "suggested_prob",
           "confident")


@dataclass
class LabelIssues:
    """Suspected label errors of one set of predictions.

    Attributes:
        csv_path: Where label_issues.csv was written.
        rows: One dict per suspect, best first, with the keys of `COLUMNS` (plus fold).
        n_images: Images examined.
        source: The predictions file ranked.
    """

    csv_path: Path
    rows: list[dict]
    n_images: int
    source: Path

    def top(self, fraction: float) -> list[dict]:
        """The highest-ranked suspects, at most `fraction` of the images examined."""
        return self.rows[: int(round(fraction * self.n_images))]


def predictions_file(target: str | Path) -> Path:
    """The predictions to rank in a cross-validation folder, a run directory or a CSV file.

    Raises:
        ImgclfError: `target` holds neither oof_predictions.csv nor predictions.csv.
    """
    target = Path(target)
    if target.is_file() and target.suffix.lower() == ".csv":
        return target
    for name in (OOF, "predictions.csv"):
        if (target / name).is_file():
            return target / name
    raise ImgclfError(f"{target}: no {OOF} or predictions.csv: pass a cross-validation folder "
                      "(`imgclf cv`) or a finished run directory")


def find_label_issues(target: str | Path, refresh_report: bool = False) -> LabelIssues:
    """Rank suspected label errors and write label_issues.csv next to the predictions.

    The count and the top suspects are logged (the table as view "label_issues").

    Args:
        target: Cross-validation folder (uses oof_predictions.csv), run directory (uses its
            validation predictions.csv) or a predictions CSV file.
        refresh_report: Rebuild the run's report.html so that it shows the suspects (when
            `target` is a finished run).

    Returns:
        The suspects, best first.

    Raises:
        ImgclfError: No predictions found, or the predictions are multi-label.
    """
    source = predictions_file(target)
    try:
        preds = evaluation.Predictions.from_csv(source)
    except (ValueError, KeyError) as e:
        raise ImgclfError(f"{source}: cannot be read as predictions ({e})") from None
    if preds.multi_label:
        raise ImgclfError(f"{source}: label-issues handles single-label predictions only")
    folds = _fold_column(source)
    rows = []
    for rank, r in enumerate(rank_label_issues(preds), 1):
        row = {"rank": rank, "path": preds.paths[r["index"]], "given": r["given"],
               "suggested": r["suggested"], "score": r["score"], "given_prob": r["given_prob"],
               "suggested_prob": r["suggested_prob"], "confident": r["confident"]}
        if folds is not None:
            row["fold"] = folds[r["index"]]
        rows.append(row)
    out = source.parent / FILENAME
    _write(out, rows, with_fold=folds is not None)
    result = LabelIssues(out, rows, len(preds.paths), source)
    _log(result)
    if refresh_report:
        _refresh_report(source.parent)
    return result


def _fold_column(path: Path) -> list[int] | None:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "fold" not in (reader.fieldnames or []):
            return None
        return [int(r["fold"]) for r in reader]


def _write(path: Path, rows: list[dict], with_fold: bool) -> None:
    buf = io.StringIO()
    cols = [*COLUMNS, "fold"] if with_fold else list(COLUMNS)
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else int(v) if isinstance(v, bool) else v
                    for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_label_issues(path: str | Path) -> list[dict]:
    """label_issues.csv back as dicts (numbers parsed)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["rank"] = int(r["rank"])
        r["confident"] = r["confident"] == "1"
        for k in ("score", "given_prob", "suggested_prob"):
            r[k] = float(r[k])
        if "fold" in r:
            r["fold"] = int(r["fold"])
    return rows


def _log(result: LabelIssues, limit: int = 20) -> None:
    n = len(result.rows)
    sure = sum(r["confident"] for r in result.rows)
    log.info("%d suspected label errors among %d images (%s; %d also flagged by confident "
             "learning); nothing was relabelled", n, result.n_images, result.source.name, sure)
    if n:
        top = [{**r, "path": _short(r["path"])} for r in result.rows[:limit]]
        log.info("Top %d (highest score first)", len(top),
                 extra={"view": "label_issues", "data": top})
    log.info("Wrote %s", result.csv_path)


def _short(path: str, keep: int = 3) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-keep:])) if len(parts) > keep else path


def _refresh_report(folder: Path) -> None:
    """Rebuild a run's report.html so that it shows the new label_issues.csv."""
    if not (folder / "config.yaml").is_file() or not (folder / "metrics.json").is_file():
        return
    train_cmd.write_report(folder)
