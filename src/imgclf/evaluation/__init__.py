"""From validation predictions to numbers, decision thresholds and error analysis.

Everything here starts from a `Predictions` object (the probabilities a trained model gave the
validation images, their targets and paths) and is a pure function of it: metrics, multi-label
threshold search, confusion matrices, most-confused pairs, top losses, PR/ROC curves,
calibration and suspected label errors. Nothing here needs torch, and nothing here imports
training: targets and probabilities are numpy arrays.

Undefined numbers (the AP of a class with no positive example, ...) are None in metric dicts so
that they serialise to strict JSON, and NaN in curve and calibration data meant for plots.

    predictions.py   Predictions (and predictions.csv)
    scoring.py       metrics: accuracy, F1, AP, ... for single- and multi-label predictions
    thresholds.py    the multi-label decision-threshold search
    analysis.py      confusion, most confused, top losses, curves, calibration, label issues
    ranking.py       precision/recall/F1 counts, top-k, PR and ROC curves, AP, AUC (numpy)
"""

from imgclf.evaluation.analysis import (calibration, confused, confusion, confusion_normalized,
                                        label_issues, most_confident_wrong, most_confused,
                                        multilabel_confusion, pr_curves, rank_label_issues,
                                        roc_curves, top_losses)
from imgclf.evaluation.predictions import EPS, Predictions
from imgclf.evaluation.scoring import (f1_macro_multilabel, hamming_accuracy, metrics,
                                       multi_label_metrics, single_label_metrics,
                                       zero_one_accuracy)
from imgclf.evaluation.thresholds import THRESHOLD_METRICS, ThresholdSearch, search_thresholds

__all__ = [
    "EPS", "Predictions",
    "f1_macro_multilabel", "hamming_accuracy", "metrics", "multi_label_metrics",
    "single_label_metrics", "zero_one_accuracy",
    "THRESHOLD_METRICS", "ThresholdSearch", "search_thresholds",
    "calibration", "confused", "confusion", "confusion_normalized", "label_issues",
    "most_confident_wrong", "most_confused", "multilabel_confusion", "pr_curves",
    "rank_label_issues", "roc_curves", "top_losses",
]
