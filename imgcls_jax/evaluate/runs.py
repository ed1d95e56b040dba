"""A finished run: reload its model (:func:`load_run`) and evaluate it on a split of its manifest
(:func:`evaluate_run`): loss, top-1/top-5, confusion matrix, classification report, plots.

One set of defaults, for the API and ``imgcls-jax evaluate`` / ``predict`` / ``train`` alike:
the **best** checkpoint (by the monitored validation metric; the latest one for a run that has
none, because it has no validation split: :func:`resolve_checkpoint`), and the **test** split,
else the **val** split (:func:`resolve_split`). What was used is logged and written to
``eval_<split>/metrics.json`` (``checkpoint``, ``epoch``).

``evaluate_run(run_dir, split)`` runs every image of the split once through the one evaluation
loop (:func:`imgcls_jax.train.evaluate_batches`: padded batches masked, sums and the confusion
matrix accumulated on the devices) and writes into ``run_dir/eval_<split>/``: ``report.txt``
(laid out like the original experiment's report), ``metrics.json``, ``confusion_matrix.png``
and, from ``metrics.csv``, ``learning_curves.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls_jax.config import TrainConfig
from imgcls_jax.evaluate.metrics import classification_report, classification_report_dict
from imgcls_jax.train.rundir import CHECKPOINT_CHOICES, RunDir, RunMismatchError

log = logging.getLogger(__name__)

#: ``which`` checkpoint :func:`load_run` restores.
CHECKPOINTS = CHECKPOINT_CHOICES
#: The splits :func:`evaluate_run` takes by default, the first one the run has.
DEFAULT_SPLITS = ("test", "val")


def resolve_checkpoint(run: RunDir, which: str | None) -> str:
    """``which`` (``"best"`` or ``"latest"``) as asked; by default ``"best"``, or ``"latest"`` for
    a run that has no best checkpoint (no validation split to choose one by), said in the log."""
    if which is not None:
        run.checkpoint_dir(which)  # a bad name is a ValueError here
        return which
    if run.has_best():
        return "best"
    log.info("%s has no best checkpoint (no validation split to choose one): using the latest", run.root)
    return "latest"


def resolve_split(run: RunDir, split: str | None) -> str:
    """``split`` if the run's manifest has it; by default its test split, else its val split.
    ``DatasetError`` naming the manifest and its splits otherwise."""
    from imgcls_jax.data.folders import DatasetError, read_manifest

    splits = {r.split for r in read_manifest(run.manifest)[0]}
    if split is not None:
        if split not in splits:
            raise DatasetError(f"{run.manifest}: no '{split}' split (splits: {sorted(splits)})")
        return split
    for name in DEFAULT_SPLITS:
        if name in splits:
            return name
    raise DatasetError(
        f"{run.manifest}: no 'test' or 'val' split to evaluate (splits: {sorted(splits)}); name one"
    )


@dataclass
class LoadedRun:
    """A trained model with what is needed to use it."""

    run_dir: Path
    config: TrainConfig
    model: object
    class_names: list[str]
    epoch: int
    which: str

    @property
    def image_size(self) -> tuple[int, int]:
        """Input size of the restored epoch (its phase's ``image_size``)."""
        return self.config.size_at(self.epoch)


def run_class_names(run_dir) -> list[str]:
    """Class names of a run, from its ``manifest.csv`` (written by ``fit``)."""
    from imgcls_jax.data.folders import read_manifest  # no TensorFlow in this module

    run = RunDir(run_dir).require("manifest.csv")
    return read_manifest(run.manifest)[1]


def load_run(run_dir, which: str | None = None) -> LoadedRun:
    """Rebuild a run's model from its ``config.json`` and restore its ``best`` (by the monitored
    validation metric) or ``latest`` checkpoint (default: :func:`resolve_checkpoint`).

    Raises ``NotARunError`` (not a run folder), ``ConfigError``/``DatasetError`` (its config.json
    or manifest.csv edited into something invalid), :class:`RunMismatchError` (edited into another
    model than the checkpoint holds), ``FileNotFoundError`` (no such checkpoint)."""
    from flax import nnx

    from imgcls_jax.models.registry import model_from_config
    from imgcls_jax.train.checkpoints import restore_model

    run = RunDir(run_dir)
    if which is not None:
        run.checkpoint_dir(which)  # a bad `which` fails before anything is read
    run.require("manifest.csv")
    which = resolve_checkpoint(run, which)
    config = TrainConfig.from_json(run.config)
    class_names = run_class_names(run.root)
    build = lambda: model_from_config(config, len(class_names), weights=None)  # noqa: E731
    mismatch = _shape_mismatch(run.checkpoint_dir(which), nnx.eval_shape(build))  # shapes only: cheap
    if mismatch is not None:
        raise RunMismatchError(
            f"{run.root}: the {which} checkpoint does not fit the model that config.json and manifest.csv "
            f"({len(class_names)} classes) describe: {mismatch}. Were they edited? Restore them from the "
            "run that wrote the checkpoint."
        )
    model = build()
    epoch = restore_model(run, which, model)
    model.eval()
    log.info("loaded %s checkpoint of %s (epoch %d)", which, run.root, epoch)
    return LoadedRun(run.root, config, model, class_names, epoch, which)


def _shape_mismatch(directory: Path, model) -> str | None:
    """The first parameter whose shape in the newest checkpoint under ``directory`` differs from
    ``model``'s (``"head_logits/kernel: checkpoint (8, 3), model (8, 4)"``), else ``None`` (also
    when the checkpoint's metadata cannot be read: then the restore itself reports)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    if not directory.is_dir():
        return None
    steps = sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not steps or not (steps[-1] / "params").is_dir():
        return None
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns "_CHECKPOINT_METADATA does not exist": expected here
    try:
        stored = ocp.StandardCheckpointer().metadata(steps[-1] / "params").item_metadata.tree
    except Exception:  # noqa: BLE001 - no readable metadata: nothing to compare, the restore reports
        return None
    finally:
        absl.setLevel(level)
    ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_stored = {_named(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    for key, leaf in jax.tree_util.tree_leaves_with_path(ours):
        theirs = flat_stored.get(_named(key))  # a name missing there: not ours to judge, orbax will
        if theirs is not None and tuple(theirs.shape) != tuple(leaf.shape):
            return f"{_named(key)}: checkpoint {tuple(theirs.shape)}, model {tuple(leaf.shape)}"
    return None


def _named(path) -> str:
    """A pytree key path as ``"head_logits/kernel"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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
    """Evaluate ``model`` (every layer as it is) on every image of an evaluation ``Pipeline``."""
    from imgcls_jax.train.evaluation import evaluate_batches
    from imgcls_jax.train.state import split_model
    from imgcls_jax.train.steps import make_eval_step

    whole = split_model(model, ())  # nothing trained: the model's own parameters are all "frozen"
    step = make_eval_step(whole)
    totals = evaluate_batches(
        lambda batch: step(whole.trainable, whole.frozen, batch),
        pipeline.epoch(0),
        expected=pipeline.num_examples,
    )
    return EvalResult(
        split=split,
        count=totals.count,
        loss=totals.loss,
        top1=totals.accuracy,
        top5=totals.top5,
        confusion=totals.confusion,
        class_names=list(class_names),
        report_text=classification_report(totals.confusion, class_names, digits=2),
        report=classification_report_dict(totals.confusion, class_names),
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


def evaluate_run(run_dir, split: str | None = None, which: str | None = None) -> EvalResult:
    """Evaluate a run's checkpoint on one split of its manifest; writes the report and plots.

    Defaults (see the module docstring): the test split, else val; the best checkpoint, else the
    latest."""
    from imgcls_jax.data import from_records, make_pipeline, read_manifest
    from imgcls_jax.evaluate.plots import plot_confusion_matrix, plot_learning_curves

    run = RunDir(run_dir).require("manifest.csv")  # the images first: before the model is built
    if which is not None:
        run.checkpoint_dir(which)
    split = resolve_split(run, split)
    data = TrainConfig.from_json(run.config).data
    records, class_names = read_manifest(run.manifest, root=data, check_splits=[split])
    chosen = [r for r in records if r.split == split]
    loaded = load_run(run_dir, which)
    pipeline = make_pipeline(  # tf.data where TensorFlow imports, else Pillow + NumPy
        from_records(chosen, class_names), image_size=loaded.image_size,
        batch_size=loaded.config.eval_batch_size or loaded.config.batch_size, training=False, cache=None,
    )  # fmt: skip
    result = evaluate_model(loaded.model, pipeline, class_names, split)
    history = run.read_history()
    out = run.eval_dir(split)
    out.mkdir(exist_ok=True)
    result.out_dir = out
    (out / "report.txt").write_text(format_report(result, history) + "\n")
    metrics = {
        "split": split, "count": result.count, "loss": result.loss, "top1": result.top1, "top5": result.top5,
        "confusion_matrix": result.confusion.tolist(), "class_names": class_names, "report": result.report,
        "checkpoint": loaded.which, "epoch": loaded.epoch,
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(result.confusion, class_names, out / "confusion_matrix.png")
    if history:
        plot_learning_curves(history, out / "learning_curves.png")
    log.info(
        "%s: %s top-1 %.4f over %d images; report in %s", run.root, split, result.top1, result.count, out
    )
    return result
