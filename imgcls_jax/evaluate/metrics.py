"""Classification metrics: a jittable confusion-matrix accumulator, top-k counts, and the report.

Conventions: ``K`` classes, labels and predictions are class indices in ``[0, K)``; a confusion
matrix ``cm: int[K, K]`` has rows = true class and columns = predicted class, so ``cm[i, j]``
counts images of class ``i`` predicted as ``j``.

:func:`confusion_matrix_update` and :func:`topk_correct` (from :mod:`imgcls_jax.train.metrics`,
where evaluation steps use them) are pure JAX and run under ``jax.jit`` (padded batch entries are
masked out). The report functions are NumPy on the host and give the
same text and numbers as ``sklearn.metrics.classification_report(y_true, y_pred,
labels=range(K), target_names=..., digits=..., zero_division=0)`` for any ``y_true, y_pred``
whose confusion matrix is ``cm`` (scikit-learn itself is not imported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgcls_jax.train.metrics import confusion_matrix_update, topk_correct  # noqa: F401  (re-exported)

AVERAGE_KEYS = ("accuracy", "macro avg", "weighted avg")
REPORT_HEADERS = ("precision", "recall", "f1-score", "support")


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """NumPy confusion matrix: ``int64[K, K]``, rows = true class, columns = predicted.

    Raises ValueError naming the first label/prediction outside ``[0, num_classes)``.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(
            f"labels {labels.shape} and predictions {predictions.shape} must be equal 1-D shapes"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for what, v in (("labels", labels), ("predictions", predictions)):
        if v.size and not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got dtype {v.dtype}")
        bad = np.flatnonzero((v < 0) | (v >= num_classes))
        if bad.size:
            raise ValueError(f"{what}[{bad[0]}] = {v[bad[0]]} is outside [0, {num_classes})")
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def check_confusion_matrix(cm) -> np.ndarray:
    """Validate a host confusion matrix: square, integral, non-negative -> int64[K, K]."""
    a = np.asarray(cm)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square [K, K] with K >= 1, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"confusion matrix must hold counts, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a) & (a == np.round(a))):
        bad = np.argwhere(~(np.isfinite(a) & (a == np.round(a))))[0]
        raise ValueError(f"confusion matrix must hold whole counts; cm[{bad[0]}, {bad[1]}] = {a[tuple(bad)]}")
    if np.any(a < 0):
        bad = np.argwhere(a < 0)[0]
        raise ValueError(f"confusion matrix counts must be >= 0; cm[{bad[0]}, {bad[1]}] = {a[tuple(bad)]}")
    return a.astype(np.int64)


def accuracy_from_cm(cm) -> float:
    """Fraction of correct predictions, ``trace / total`` (0.0 for an empty matrix)."""
    counts = check_confusion_matrix(cm)
    total = counts.sum()
    return float(np.trace(counts) / total) if total else 0.0


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` in float64, 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    den = den.astype(np.float64)
    return np.where(den == 0, 0.0, num.astype(np.float64) / np.where(den == 0, 1.0, den))


def per_class_scores(cm) -> dict[str, np.ndarray]:
    """Per-class scores of ``cm``: float64[K] ``precision``, ``recall``, ``f1-score``; int64[K] ``support``.

    precision = tp / predicted, recall = tp / true, f1 = 2 tp / (true + predicted); 0 where a
    denominator is 0.
    """
    counts = check_confusion_matrix(cm)
    tp, predicted, true = np.diag(counts), counts.sum(axis=0), counts.sum(axis=1)
    return {
        "precision": _divide(tp, predicted),
        "recall": _divide(tp, true),
        "f1-score": _divide(2 * tp, true + predicted),
        "support": true,
    }


def check_class_names(class_names: Sequence[str], k: int) -> list[str]:
    names = list(class_names)
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix: {names}")
    not_str = [n for n in names if not isinstance(n, str)]
    if not_str:
        raise ValueError(f"class names must be strings, got {not_str[0]!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class names must be unique, repeated: {dupes}")
    return names


def average_scores(scores: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """``{"macro avg": [p, r, f1], "weighted avg": [p, r, f1]}`` from :func:`per_class_scores`.

    Macro is the unweighted mean over classes, weighted the support-weighted mean (the
    unweighted one when no class has support).
    """
    support = scores["support"].astype(np.float64)
    out = {}
    for key in ("macro avg", "weighted avg"):
        values = []
        for metric in REPORT_HEADERS[:3]:
            v = scores[metric]
            if key == "weighted avg" and support.sum() > 0:
                values.append(float(np.sum(v * support) / np.sum(support)))
            else:  # unweighted mean; also the weighted one when no class has support
                values.append(float(np.mean(v)))
        out[key] = values
    return out


def classification_report_dict(cm, class_names: Sequence[str]) -> dict:
    """The report as a dict shaped like scikit-learn's ``output_dict=True``.

    Returns ``{name: {"precision", "recall", "f1-score", "support"}, ..., "accuracy": float,
    "macro avg": {...}, "weighted avg": {...}}``; every value a Python float (support too, as in
    scikit-learn). Class names must be unique and must not be "accuracy"/"macro avg"/"weighted avg".
    """
    counts = check_confusion_matrix(cm)
    names = check_class_names(class_names, counts.shape[0])
    clash = [n for n in names if n in AVERAGE_KEYS]
    if clash:
        raise ValueError(f"class name {clash[0]!r} collides with a summary key of the report {AVERAGE_KEYS}")
    scores = per_class_scores(counts)
    report: dict = {name: {h: float(scores[h][i]) for h in REPORT_HEADERS} for i, name in enumerate(names)}
    report["accuracy"] = accuracy_from_cm(counts)
    total = float(counts.sum())
    for key, values in average_scores(scores).items():
        report[key] = dict(zip(REPORT_HEADERS, [*values, total]))
    return report


def classification_report(cm, class_names: Sequence[str], digits: int = 2) -> str:
    """The text report, laid out exactly as scikit-learn's ``classification_report``.

    Args:
      cm: int[K, K] confusion matrix (rows true, columns predicted).
      class_names: K unique strings, in class-index order; all K rows are listed, including
        classes never seen or never predicted (their scores are 0).
      digits: decimals of the scores (>= 0).

    Returns:
      str ending with a newline: header, one row per class, then the accuracy, macro avg and
      weighted avg lines; the name column is as wide as the longest of the names,
      "weighted avg" and ``digits``.
    """
    if isinstance(digits, bool) or not isinstance(digits, int | np.integer) or digits < 0:
        raise ValueError(f"digits must be an int >= 0, got {digits!r}")
    counts = check_confusion_matrix(cm)
    names = check_class_names(class_names, counts.shape[0])
    scores = per_class_scores(counts)
    width = max(max(len(n) for n in names), len("weighted avg"), digits)
    lines = [f"{'':>{width}s} " + "".join(f" {h:>9}" for h in REPORT_HEADERS), ""]
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}"
    for i, name in enumerate(names):
        values = [scores[h][i] for h in REPORT_HEADERS[:3]]
        lines.append(row.format(name, *values, int(scores["support"][i]), width=width, digits=digits))
    lines.append("")
    total = int(counts.sum())
    accuracy = f"{accuracy_from_cm(counts):>9.{digits}f}"
    lines.append(f"{'accuracy':>{width}s} " + f" {'':>9}" * 2 + f" {accuracy} {total:>9}")
    for key, values in average_scores(scores).items():
        lines.append(row.format(key, *values, total, width=width, digits=digits))
    return "\n".join(lines) + "\n"
