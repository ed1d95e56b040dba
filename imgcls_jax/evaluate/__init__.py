"""Evaluation: a finished run reloaded, evaluated and used to predict; metrics (confusion matrix,
top-k, classification report), plots, report audit.

No TensorFlow and no scikit-learn here (the data layer loads TensorFlow when a split is read);
matplotlib is imported only when a plot is drawn.
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
from imgcls_jax.evaluate.prediction import Prediction, predict
from imgcls_jax.evaluate.report_audit import (
    Finding,
    ParsedReport,
    ReportParseError,
    ReportTable,
    check_report_consistency,
    parse_report_text,
)
from imgcls_jax.evaluate.runs import (
    EvalResult,
    LoadedRun,
    evaluate_model,
    evaluate_run,
    format_report,
    load_run,
    run_class_names,
)

__all__ = [
    "EvalResult",
    "Finding",
    "LoadedRun",
    "Prediction",
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
    "evaluate_model",
    "evaluate_run",
    "format_report",
    "load_run",
    "parse_report_text",
    "per_class_scores",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "predict",
    "run_class_names",
    "topk_correct",
]
