"""The result of a prediction, shared by the torch predictor, the ONNX predictor and the server.

Torch-free (numpy and the standard library), so the ONNX predictor can return it too.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.io import atomic_write_text


@dataclass
class PredictionResult:
    """Predictions for a list of images.

    Attributes:
        paths: Images that were predicted (for in-memory images, the names they were given).
        probs: [N, C] float32 probabilities.
        classes: Class names.
        multi_label: Whether `thresholds` decide the labels.
        thresholds: Per-class thresholds applied (multi-label).
        errors: Images that could not be read, with the reason.
    """

    paths: list[Path]
    probs: np.ndarray
    classes: list[str]
    multi_label: bool
    thresholds: np.ndarray | None = None
    errors: dict[Path | str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The images' paths (or given names) as strings."""
        return [os.fsdecode(p) for p in self.paths]

    def labels(self) -> list[list[str]]:
        """Decided labels per image: the top class, or every class at or over its threshold."""
        if self.multi_label:
            return [[c for c, p, t in zip(self.classes, row, self.thresholds) if p >= t]
                    for row in self.probs]
        return [[self.classes[int(np.argmax(row))]] for row in self.probs]

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Up to k (class, probability) pairs per image, most probable first."""
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(self.probs[i, j])) for j in row]
                for i, row in enumerate(order)]

    def _repr_html_(self, max_rows: int = 20, k: int = 3) -> str:
        """Jupyter's view: a table of the first `max_rows` images, their labels and top `k`
        probabilities, and how many could not be read."""
        import html

        head = (f"<b>PredictionResult</b>: {len(self.paths)} images, {len(self.classes)} "
                f"classes{' (multi-label)' if self.multi_label else ''}")
        if self.errors:
            head += f", {len(self.errors)} unreadable"
        rows = []
        for name, labs, top in list(zip(self.names, self.labels(), self.top_k(k)))[:max_rows]:
            shown = ", ".join(f"{html.escape(c)} {p:.3f}" for c, p in top)
            rows.append(f"<tr><td style='text-align:left'>{html.escape(Path(name).name)}</td>"
                        f"<td style='text-align:left'><b>{html.escape(', '.join(labs))}</b></td>"
                        f"<td style='text-align:left'>{shown}</td></tr>")
        more = (f"<tr><td colspan='3'>... {len(self.paths) - max_rows} more</td></tr>"
                if len(self.paths) > max_rows else "")
        return (f"<div>{head}<table><tr><th>image</th><th>label</th><th>top {k}</th></tr>"
                f"{''.join(rows)}{more}</table></div>")

    def to_csv(self, path: str | Path) -> None:
        """path, predicted label(s), a probability column per class."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "predicted"] + [f"prob_{c}" for c in self.classes])
        for name, labs, row in zip(self.names, self.labels(), self.probs):
            # A file name that is not valid UTF-8 is written with replacement characters.
            w.writerow([name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                        " ".join(labs)] + [f"{v:.6f}" for v in row])
        atomic_write_text(path, buf.getvalue())
