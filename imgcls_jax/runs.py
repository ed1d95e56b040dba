"""Evaluate a trained run: loss, top-1/top-5, confusion matrix, classification report, plots.

``evaluate_run(run_dir, split)`` reloads the run (:func:`imgcls_jax.predict.load_run`), runs
every image of the split once (padded batches masked, confusion matrix accumulated on device)
and writes into ``run_dir/eval_<split>/``: ``report.txt`` (laid out like the original
experiment's report), ``metrics.json``, ``confusion_matrix.png`` and, from ``metrics.csv``,
``learning_curves.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Numbers over every image of one split (each counted exactly once)."""

    split: str
    count: int
    loss: float
    top1: float
    top5: float
    confusion: np.ndarray
    class_names: list[str]
    report_text: str
    report: dict = field(repr=False, default_factory=dict)
    out_dir: Path | None = None


def evaluate_model(model, pipeline, class_names, split: str = "eval") -> EvalResult:
    """Evaluate ``model`` on every image of an evaluation ``Pipeline``."""
    from flax import nnx

    from imgcls_jax.data import prefetch_to_device
    from imgcls_jax.evaluate import (
        classification_report,
        classification_report_dict,
        confusion_matrix_update,
        topk_correct,
    )
    from imgcls_jax.train.steps import cross_entropy

    k = len(class_names)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, totals, batch):
        logits = nnx.merge(graphdef, state)(batch["image"])
        mask = batch["mask"]
        losses = jnp.where(mask, cross_entropy(logits, batch["label"]), 0.0)
        predictions = jnp.argmax(logits, -1)
        return {
            "cm": confusion_matrix_update(totals["cm"], batch["label"], predictions, mask),
            "loss": totals["loss"] + losses.sum(),
            "top1": totals["top1"] + topk_correct(logits, batch["label"], mask, 1),
            "top5": totals["top5"] + topk_correct(logits, batch["label"], mask, 5),
            "count": totals["count"] + mask.sum(dtype=jnp.int32),
        }

    totals = {
        "cm": jnp.zeros((k, k), jnp.int32),
        "loss": jnp.zeros((), jnp.float32),
        "top1": jnp.zeros((), jnp.int32),
        "top5": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }
    for batch in prefetch_to_device(pipeline.epoch(0)):
        totals = step(state, totals, batch)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    if count != pipeline.num_examples:
        raise RuntimeError(f"evaluated {count} images, expected {pipeline.num_examples}")
    cm = np.asarray(totals["cm"])
    if int(cm.sum()) != count:  # a label outside 0..K-1 is not counted by the jitted update
        raise RuntimeError(f"confusion matrix holds {int(cm.sum())} of {count} images: labels out of range")
    return EvalResult(
        split=split,
        count=count,
        loss=float(totals["loss"]) / count,
        top1=int(totals["top1"]) / count,
        top5=int(totals["top5"]) / count,
        confusion=cm,
        class_names=list(class_names),
        report_text=classification_report(cm, class_names, digits=2),
        report=classification_report_dict(cm, class_names),
    )


def format_report(result: EvalResult, history: list[dict] | None = None) -> str:
    """A text report in the original experiment's shape: accuracies, confusion matrix, table."""
    lines = [f"Evaluation on split '{result.split}' ({result.count} images)", ""]
    if history:
        last = history[-1]
        lines.append(f"Training accuracy:   {100 * float(last['train_accuracy']):.2f}% (last epoch)")
        if last.get("val_accuracy") not in ("", None):
            lines.append(f"Validation accuracy: {100 * float(last['val_accuracy']):.2f}% (last epoch)")
    lines += [
        f"{result.split.capitalize()} accuracy: {100 * result.top1:.2f}% (top-5 {100 * result.top5:.2f}%, "
        f"loss {result.loss:.4f})",
        "Confusion Matrix (rows: true class, columns: predicted):",
        np.array2string(result.confusion, max_line_width=200),
        "",
        "Classification Report:",
        result.report_text,
    ]
    return "\n".join(lines)


def evaluate_run(run_dir, split: str = "val", which: str = "latest") -> EvalResult:
    """Evaluate a run's checkpoint on one split of its manifest; writes the report and plots."""
    from imgcls_jax.data import Pipeline, from_records, read_manifest
    from imgcls_jax.evaluate import plot_confusion_matrix, plot_learning_curves
    from imgcls_jax.predict import load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir, which)
    records, class_names = read_manifest(run_dir / "manifest.csv", root=loaded.config.data)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise ValueError(
            f"{run_dir}: the manifest has no '{split}' split (splits: {sorted({r.split for r in records})})"
        )
    size = loaded.image_size
    pipeline = Pipeline(
        from_records(chosen, class_names),
        image_size=size,
        batch_size=loaded.config.eval_batch_size or loaded.config.batch_size,
        training=False,
        cache=None,
    )
    result = evaluate_model(loaded.model, pipeline, class_names, split)
    history = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            history = list(csv.DictReader(f))
    out = run_dir / f"eval_{split}"
    out.mkdir(exist_ok=True)
    result.out_dir = out
    (out / "report.txt").write_text(format_report(result, history) + "\n")
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "split": split,
                "count": result.count,
                "loss": result.loss,
                "top1": result.top1,
                "top5": result.top5,
                "confusion_matrix": result.confusion.tolist(),
                "class_names": class_names,
                "report": result.report,
                "checkpoint": which,
                "epoch": loaded.epoch,
            },
            indent=2,
        )
        + "\n"
    )
    plot_confusion_matrix(result.confusion, class_names, out / "confusion_matrix.png")
    if history:
        plot_learning_curves(history, out / "learning_curves.png")
    log.info("%s: %s top-1 %.4f over %d images; report in %s", run_dir, split, result.top1, result.count, out)
    return result
