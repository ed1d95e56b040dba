"""PNG plots of an evaluation: the confusion matrix and the learning curves of ``metrics.csv``.

matplotlib is imported inside the functions and used through its object API on the Agg canvas
(``matplotlib.figure.Figure``), so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgcls_jax.evaluate.metrics import check_class_names, check_confusion_matrix

log = logging.getLogger(__name__)

CURVE_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    log.info("wrote %s", path)
    return path


def plot_confusion_matrix(cm, class_names: Sequence[str], path, normalize: bool = False) -> Path:
    """Draw ``cm`` (int[K, K], rows = true class, columns = predicted) as a labelled heat map PNG.

    Every cell shows its count; with ``normalize=True`` the colours are row fractions (recall
    per true class, classes without images stay 0) and cells show "count\\nfraction". The figure
    grows with K so names and numbers stay readable up to ~20 classes (more still renders,
    smaller). Returns ``path`` as a Path; its parent folders are created.
    """
    counts = check_confusion_matrix(cm)
    k = counts.shape[0]
    names = check_class_names(class_names, k)
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    colour = fractions if normalize else counts
    longest = max(len(n) for n in names)
    side = max(4.0, 0.5 * k + 0.09 * min(longest, 30) + 2.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(colour, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, counts.max()))
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "images")
    font = 9 if k <= 10 else 7 if k <= 20 else 5
    threshold = (1 if normalize else max(1, counts.max())) / 2
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]}\n{fractions[i, j]:.2f}" if normalize else f"{counts[i, j]}"
            dark = colour[i, j] > threshold
            ax.text(j, i, text, ha="center", va="center", fontsize=font, color="white" if dark else "black")
    ax.set_xticks(range(k), names, rotation=45 if longest > 3 else 0, ha="right" if longest > 3 else "center")
    ax.set_yticks(range(k), names)
    ax.tick_params(labelsize=font + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    ax.set_title(f"Confusion matrix: {total} images, accuracy {100 * accuracy:.2f}%")
    return _save(fig, path)


def _number(row: dict, key: str, index: int) -> float:
    """A metrics.csv cell as float; "" or None (no value, e.g. no validation split) -> NaN."""
    value = row.get(key, "")
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"history row {index}: {key}={value!r} is not a number") from None


def _history_arrays(history: Sequence[dict]) -> dict[str, np.ndarray]:
    if not history:
        raise ValueError("plot_learning_curves: history is empty (no epochs to plot)")
    for index, row in enumerate(history):
        missing = [k for k in ("epoch", "train_loss", "train_accuracy") if k not in row]
        if missing:
            raise ValueError(f"history row {index} has no {missing} (keys: {sorted(row)})")
    out = {key: np.array([_number(row, key, i) for i, row in enumerate(history)]) for key in CURVE_KEYS}
    out["epoch"] = np.array([_number(row, "epoch", i) for i, row in enumerate(history)])
    if np.isnan(out["epoch"]).any():
        raise ValueError(f"history has rows without an epoch number: {out['epoch'].tolist()}")
    out["phase"] = np.array([str(row.get("phase", "")) for row in history])
    return out


def plot_learning_curves(history: Sequence[dict], path) -> Path:
    """Plot loss and accuracy per epoch (train and validation), and the learning rate if logged.

    Args:
      history: one dict per epoch as read from ``metrics.csv`` (values str or float): keys
        ``epoch``, ``train_loss``, ``train_accuracy`` required; ``phase``, ``val_loss``,
        ``val_accuracy``, ``learning_rate`` optional, "" meaning no value (e.g. no validation
        split). Accuracies are fractions in [0, 1].
      path: the PNG to write (parent folders are created).

    Phase changes are marked by dotted vertical lines labelled with the new phase.
    Raises ValueError for an empty history, a missing required key or a non-numeric value.
    """
    h = _history_arrays(history)
    has_lr = not np.isnan(h["learning_rate"]).all()
    panels = 3 if has_lr else 2
    fig = _new_figure(4.2 * panels, 3.6)
    axes = fig.subplots(1, panels)
    epoch = h["epoch"]
    marker = "o" if len(epoch) <= 30 else None
    for ax, what in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            values = h[f"{split}_{what}"]
            if not np.isnan(values).all():
                ax.plot(epoch, values, style, marker=marker, markersize=3, label=f"{split} {what}")
        ax.set_title(what)
        ax.legend(fontsize=8)
    if has_lr:
        axes[2].plot(epoch, h["learning_rate"], "-", marker=marker, markersize=3, color="tab:green")
        axes[2].set_title("learning rate (last step of the epoch)")
        if (h["learning_rate"][~np.isnan(h["learning_rate"])] > 0).all():
            axes[2].set_yscale("log")
    phases = h["phase"]
    changes = [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        for i in changes:
            x = (epoch[i - 1] + epoch[i]) / 2
            ax.axvline(x, color="gray", linestyle=":", linewidth=1)
            ax.annotate(
                f"phase {phases[i]}", (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                textcoords="offset points", fontsize=7, color="gray",
            )  # fmt: skip
    return _save(fig, path)
