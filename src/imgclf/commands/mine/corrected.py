"""Corrections from `imgclf review` in hard negative mining (`imgclf mine --corrections FILE`).

Rows about labelled images are applied to the run's data as `imgclf train --corrections`
applies them (after the run's own corrections, when it was trained with some): relabelled
images get their new labels, excluded ones leave. In single-label data whose model has no
negative class yet, an image marked negative joins mining's negatives instead of becoming a
class of its own: a training image is trained on as a negative from round 0 on, a validation
image joins the held-out negatives V. (When the model has the negative class, or the data is
multi-label, it is an ordinary sample of that class or with no label.)

Rows about pool images (source `pool`, which the review writes for mined negatives) must name
an image of the pool or of --valid-negatives; those excluded or relabelled (they show a class,
or should not be used) leave the pool: never mined, never in V. Keep and negative leave them as
negatives.

The file is read once, when mining starts: pool.json records its sha256, and a rerun that finds
another file is refused. Bad rows are reported line by line and nothing is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.corrections import apply_corrections, file_digest, read_corrections
from imgclf.data.samples import TRAIN, VALID, SampleTable
from imgclf.errors import DataError, display_path


@dataclass
class Corrected:
    """The labelled data after the corrections, and what they mean for the pool.

    Attributes:
        table: The labelled images (without those that joined the negatives).
        train_negatives: Training images marked negative: trained on as negatives.
        valid_negatives: Validation images marked negative: held-out negatives.
        pool_removed: Pool images that leave the pool.
        digest: sha256 of the file (None without corrections).
    """

    table: SampleTable
    train_negatives: list[str] = field(default_factory=list)
    valid_negatives: list[str] = field(default_factory=list)
    pool_removed: set[str] = field(default_factory=set)
    digest: str | None = None


def apply(table: SampleTable, corrections: str | None, negative_label: str,
          model_classes: list[str], pool: list[Path], recorded: dict | None) -> Corrected:
    """Apply a corrections file for mining.

    Args:
        table: The run's labelled data, as `load_table` reads it.
        corrections: The file (None: nothing to apply).
        negative_label: Mining's negative class.
        model_classes: The classes of the model before mining.
        pool: Every image of the pool and of --valid-negatives (with those removed before, on a
            rerun), which pool rows may name.
        recorded: pool.json of an earlier start, whose corrections digest must match.

    Raises:
        DataError: Bad rows (one error listing them), or the file changed since mining started.
    """
    if not corrections:
        return Corrected(table)
    digest = file_digest(corrections)
    before = (recorded or {}).get("corrections_sha256")
    if recorded is not None and before != digest:
        raise DataError(f"{display_path(corrections)}: not the corrections file this mining "
                        f"started with (sha256 {str(before)[:12]}..., now {digest[:12]}...): "
                        "restore it, or mine again from the start with --restart")
    out, applied = apply_corrections(table, read_corrections(corrections), source=corrections,
                                     digest=digest, negative_label=negative_label,
                                     pool=[str(p) for p in pool])
    fixed = Corrected(out, pool_removed=set(applied.pool_removed), digest=digest)
    if table.multi_label or negative_label in model_classes or not applied.counts["negative"]:
        return fixed
    neg = (negative_label,)
    fixed.train_negatives = [str(s.path) for s in out.samples if s.labels == neg and s.split == TRAIN]
    fixed.valid_negatives = [str(s.path) for s in out.samples if s.labels == neg and s.split == VALID]
    fixed.table = out.with_samples([s for s in out.samples if s.labels != neg])
    fixed.table.classes = [c for c in out.classes if c != negative_label]
    fixed.table.notes = [n for n in fixed.table.notes if f"class '{negative_label}' added" not in n]
    fixed.table.notes.append(
        f"{len(fixed.train_negatives)} training and {len(fixed.valid_negatives)} validation "
        f"images marked negative join mining's negatives ('{negative_label}')")
    return fixed


def seeds(paths: list[str]) -> list[dict]:
    """Round-0 picks for training images marked negative (what the model called them is not
    asked: they are negatives by a person's decision)."""
    return [{"path": p, "predicted": None, "confidence": None, "source": "corrections"}
            for p in paths]
