"""Evaluation: metrics (confusion matrix, top-k, classification report), plots, report audit.

No TensorFlow and no scikit-learn here; matplotlib is imported only when a plot is drawn.
"""

from imgcls_jax.evaluate.metrics import (
    accuracy_from_cm,
    average_scores,
    classification_report,
    classification_report_dict,
    confusion_matrix,
    confusion_matrix_update,
    per_class_scores,
    topk_correct,
)
from imgcls_jax.evaluate.plots import plot_confusion_matrix, plot_learning_curves
from imgcls_jax.evaluate.report_audit import (
    Finding,
    ParsedReport,
    ReportParseError,
    ReportTable,
    check_report_consistency,
    parse_report_text,
)

__all__ = [
    "Finding",
    "ParsedReport",
    "ReportParseError",
    "ReportTable",
    "accuracy_from_cm",
    "average_scores",
    "check_report_consistency",
    "classification_report",
    "classification_report_dict",
    "confusion_matrix",
    "confusion_matrix_update",
    "parse_report_text",
    "per_class_scores",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "topk_correct",
]
