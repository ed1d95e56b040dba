"""``fit(config)``: train a run phase by phase and epoch by epoch, with checkpoints and resume.

The :class:`Trainer` does one thing per method: set up a phase (:meth:`Trainer.start_phase`:
which layers train, the optimizer, the state, restored when resuming), train one epoch,
validate, and the after-epoch hooks (reduce-on-plateau, the metrics row, the checkpoint,
TensorBoard, callbacks, early stopping). The run folder is a
:class:`~imgcls_jax.train.rundir.RunDir`.

With ``config.ema_decay`` set, each phase keeps an exponential moving average of its trainable
weights (:func:`imgcls_jax.train.state.ema_update`, starting at the phase's initial weights);
validation, the saved ``params`` (latest and best) and the next phase's starting point are the
average, as with Keras's ``use_ema``; the raw weights and the average both resume exactly.

Resuming (``resume=True``, the default) restores the latest checkpoint and continues with the
next epoch. Epoch ``e``'s data order and augmentation and every step's dropout mask depend
only on the seed, ``e`` and the step, so a run stopped after a checkpoint and resumed ends with
the same parameters as an uninterrupted one. An epoch's ``metrics.csv`` row is written before
its checkpoint, and a resumed run drops the rows of epochs after its checkpoint, so each epoch
is in ``metrics.csv`` exactly once. A resumed run first redoes the ``best/`` saves a kill cut
short; one that had finished (its last epoch, or its early stop, checkpointed) trains nothing
and returns the checkpoint's model. Tested by killing runs at many moments
(tests/test_kill_moments.py, with :mod:`imgcls_jax.train.faults`).

Devices and processes (``jax.distributed``, see :mod:`imgcls_jax.parallel`): ``fit`` runs
data-parallel over every device of every process. ``batch_size`` is the global batch; each
process reads a disjoint, equal share of the train images and a share of each evaluation split
(every image counted once, the numbers identical on all processes). The trained state is
replicated (or sharded FSDP-style with ``config.fsdp_min_size``). Process 0 alone writes
``config.json``, the manifest, ``metrics.csv``, TensorBoard events and the progress bar; every
process takes part in the orbax checkpoint saves and restores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax import parallel
from imgcls_jax.config import (
    RESULT_NEUTRAL_FIELDS,
    PhaseConfig,
    TrainConfig,
    appended_phases,
    check_devices,
    check_trainable,
    resume_differences,
)
from imgcls_jax.train.callbacks import best_epoch, early_stopping_epoch, improvements, plateau_learning_rates
from imgcls_jax.train.checkpoints import Checkpoints, finished_steps, model_items, set_model_items, state_item
from imgcls_jax.train.evaluation import evaluate_batches
from imgcls_jax.train.faults import kill_point
from imgcls_jax.train.inputs import feature_inputs, run_inputs, run_records
from imgcls_jax.train.monitor import NoBoard, TensorBoard, progress
from imgcls_jax.train.optim import OptimizerSpec, lr_scale, set_lr_scale
from imgcls_jax.train.rundir import RunDir, RunMismatchError
from imgcls_jax.train.state import SplitModel, TrainState, init_state, split_model
from imgcls_jax.train.steps import head_forward, image_forward, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    model: object = None
    class_names: list[str] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class Phase:
    """One phase being trained: its layers, optimizer, state, steps and inputs."""

    index: int
    config: PhaseConfig
    epochs: range
    split: SplitModel
    spec: OptimizerSpec
    hyper: dict
    state: TrainState
    train_step: Callable
    eval_step: Callable
    train: Any  # a Pipeline or FeatureBatches
    evals: dict


def fit(config: TrainConfig, *, resume: bool = True, callbacks: Sequence[Callable] = ()) -> FitResult:
    """Train ``config``'s model on its data, phase by phase; see the module docstring.

    ``callbacks``: called as ``callback(epoch, row)`` after each epoch is checkpointed and
    logged (``row``: that epoch's ``metrics.csv`` values). An exception raised by a callback
    (e.g. ``optuna.TrialPruned``) stops the run and propagates; checkpoints stay consistent.
    """
    return Trainer(config, resume=resume, callbacks=callbacks).run()


def refuse_used_run_dir(run: RunDir) -> None:
    """``resume=False`` into a folder that holds an earlier run's checkpoints: ``FileExistsError``
    before anything is trained or written (the earlier run is not mixed in nor deleted)."""
    held = [d.name for d in (run.checkpoints, run.best) if finished_steps(d)]
    if held:
        raise FileExistsError(
            f"{run.root} holds checkpoints of an earlier run ({', '.join(held)}/): fit(resume=False) "
            "does not overwrite them. Resume it (resume=True), train into a new run_dir, or move it aside "
            "(imgcls-jax train --restart does: RUN_DIR.replaced-<time>)."
        )


def check_resume(config: TrainConfig, run: RunDir) -> TrainConfig | None:
    """The config stored in ``run``'s folder when ``fit`` resumes from it, reading its
    ``manifest.csv`` rather than rescanning the data (the folder holds a ``config.json`` and a
    manifest, written by an earlier start of this same run); None when it starts afresh. The folder
    is the truth: a ``config.json`` that differs from ``config`` in a field that changes results
    (:func:`~imgcls_jax.config.resume_differences`) is a :class:`RunMismatchError` listing each
    field, when the folder holds checkpoints; without one (nothing trained yet) the run starts
    afresh, with a warning. Fields that cannot change results
    (:data:`~imgcls_jax.config.RESULT_NEUTRAL_FIELDS`) may differ (logged), and phases may be
    appended after the stored ones (:func:`~imgcls_jax.config.appended_phases`: the run goes on
    into them, and its ``config.json`` becomes ``config``)."""
    if not (run.config.is_file() and run.manifest.is_file()):
        return None
    stored = TrainConfig.from_json(run.config)
    differences = resume_differences(stored, config)
    trained = any(finished_steps(d) for d in (run.checkpoints, run.best))
    if differences and trained:
        listed = "; ".join(f"{name}: {old!r} in the run, {new!r} now" for name, old, new in differences)
        raise RunMismatchError(
            f"{run.root} holds a run whose config.json differs from this one in what changes results: "
            f"{listed}. Resume it with its own config (imgcls-jax train --config {run.config}), or start "
            "afresh: imgcls-jax train --restart moves the old run aside (RUN_DIR.replaced-<time>); "
            "fit() into a new run_dir"
        )
    if differences:
        log.warning(
            "%s: config.json differs from this run's (%s) and nothing was trained yet: starting afresh",
            run.root, ", ".join(name for name, _, _ in differences),
        )  # fmt: skip
        return None
    neutral = [
        f for f in RESULT_NEUTRAL_FIELDS if f != "run_dir" and getattr(stored, f) != getattr(config, f)
    ]
    if neutral:
        log.info("%s: resuming with other %s than its config.json (they do not change results)",
                 run.root, ", ".join(neutral))  # fmt: skip
    if added := appended_phases(stored, config):
        log.info("%s: %d phase(s) appended after the run's %d: it goes on into them (config.json updated)",
                 run.root, added, len(stored.phases))  # fmt: skip
    return stored


def _groups(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter when they run out)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class Trainer:
    """Runs one :class:`~imgcls_jax.config.TrainConfig` (see the module docstring)."""

    def __init__(self, config: TrainConfig, *, resume: bool = True, callbacks: Sequence[Callable] = ()):
        check_devices(config, jax.device_count(), jax.process_count())
        check_trainable(config)
        self.config, self.resume, self.callbacks = config, resume, list(callbacks)
        self.run_dir = RunDir(config.run_dir)
        self.main = jax.process_index() == 0
        self.mesh = parallel.make_mesh()
        self.mode_max = config.monitor == "val_accuracy"
        self.stopped_early = False
        self.phase: Phase | None = None  # the phase being trained (the last one, after run())

    # ----------------------------------------------------------------------------------- setup
    def run(self) -> FitResult:
        from imgcls_jax.models.registry import model_from_config

        config, run = self.config, self.run_dir
        if not self.resume:
            refuse_used_run_dir(run)
        stored = check_resume(config, run) if self.resume else None  # before anything is written
        reuse = stored is not None
        run.root.mkdir(parents=True, exist_ok=True)
        if self.main and (not reuse or appended_phases(stored, config)):
            run.write_config(config)
        records, self.class_names = run_records(config, run.root, reuse=reuse, write=self.main)
        self.train, self.evals = run_inputs(config, records, self.class_names)
        self.model = model_from_config(config, len(self.class_names), input_size=config.size_at(0))
        if config.init_from is not None:
            from imgcls_jax.train.imported import initialize_from

            log.info(
                "the model starts from %s", initialize_from(self.model, config.init_from, self.class_names)
            )
        nnx.update(self.model, self._placed(nnx.state(self.model), replicate=True))
        self.board = TensorBoard(run.tensorboard) if self.main else NoBoard()
        try:
            with Checkpoints(run, keep=config.keep_checkpoints, monitor=config.monitor,
                             mode_max=self.mode_max) as self.checkpoints:  # fmt: skip
                self.latest = self.checkpoints.latest_step() if self.resume else None
                self.history = self._start_history()
                if self.latest is not None:
                    self._complete_best()
                self._train_phases()
        finally:
            self.board.close()
        return FitResult(run.root, self.history, self.model, self.class_names, self.stopped_early)

    def _start_history(self) -> list[dict]:
        """The rows of the epochs already checkpointed; ``metrics.csv`` rewritten to hold just
        those (a row written just before a kill, for an epoch that has no checkpoint, goes)."""
        if self.latest is None:
            if self.main:
                self.run_dir.write_history([])
            return []
        rows = self.run_dir.read_history(upto=self.latest)
        if self.main:
            self.run_dir.write_history(rows)
        log.info("resuming %s after epoch %d", self.run_dir.root, self.latest)
        return rows

    def _complete_best(self) -> None:
        """``best/`` saves a kill cut short, redone from their checkpoints (see
        :meth:`~imgcls_jax.train.checkpoints.Checkpoints.complete_best`)."""
        targets = {k: self._target(v, replicate=True) for k, v in model_items(self.model).items()}
        self.checkpoints.complete_best(self.history, lambda epoch: self.checkpoints.restore(epoch, targets))

    def _finished_before(self) -> bool:
        """Resuming a run whose last epoch, or early stop, was checkpointed: nothing to train;
        ``self.model`` gets the latest checkpoint (what a finished run returns)."""
        if self.latest is None:
            return False
        if self.latest < self.config.phase_epochs(len(self.config.phases) - 1)[-1]:
            self.early_stopping(self.latest)  # the uninterrupted run stopped after this epoch
            if not self.stopped_early:
                return False
        log.info(
            "%s: finished before (epoch %d checkpointed), nothing to train", self.run_dir.root, self.latest
        )
        self._restore_model(inside=False)
        return True

    def _placed(self, tree, *, replicate: bool = False):
        """``tree`` on the mesh: replicated, or the trained state's layout (FSDP leaves sharded)."""
        if jax.device_count() == 1:
            return tree
        fsdp = None if replicate else self.config.fsdp_min_size
        return parallel.place(tree, parallel.tree_shardings(tree, self.mesh, fsdp_min_size=fsdp))

    def _target(self, tree, *, replicate: bool = False):
        """What orbax restores ``tree`` as: abstract arrays on the mesh, in ``_placed``'s layout."""
        fsdp = None if replicate else self.config.fsdp_min_size
        return parallel.restore_target(tree, parallel.tree_shardings(tree, self.mesh, fsdp_min_size=fsdp))

    def _train_phases(self) -> None:
        if self._finished_before():
            return
        for index in range(len(self.config.phases)):
            epochs = self.config.phase_epochs(index)
            if self.latest is not None and epochs[-1] <= self.latest:
                continue  # finished before the interruption; its parameters come with the restore
            phase = self.phase = self.start_phase(index)
            for epoch in epochs:
                if self.latest is not None and epoch <= self.latest:
                    continue
                row = self.train_epoch(phase, epoch)
                self.validate(phase, row)
                self.after_epoch(phase, epoch, row)
                if self.stopped_early:
                    return
            self.latest = None

    # ------------------------------------------------------------------------------- one phase
    def start_phase(self, index: int) -> Phase:
        """Set up phase ``index``: restore the model when resuming, split it, build the optimizer
        and state (restored when resuming inside the phase), the steps and the inputs."""
        config, model = self.config, self.model
        phase_config, epochs = config.phases[index], config.phase_epochs(index)
        names = model.trainable_layers(phase_config.trainable)
        spec, hyper = OptimizerSpec.for_phase(
            phase_config, len(self.train), model.head_layers, config.grad_clip
        )
        restored = self._restore_model(inside=self.latest is not None and self.latest >= epochs[0])
        split = split_model(model, names)
        state = init_state(split, spec.build(hyper), ema=config.ema_decay is not None)
        if restored:
            state = self._restore_state(split, state, restored)
        state, split.frozen = self._placed(state), self._placed(split.frozen, replicate=True)
        size = config.phase_size(index)
        self.train, self.evals = self.train.resized(size), {k: p.resized(size) for k, p in self.evals.items()}
        train, evals, forward = self._phase_inputs(index, names)
        placement = (self.mesh, config.fsdp_min_size) if jax.device_count() > 1 else None
        augment = train.augment_on_device if forward is image_forward else None
        seed_key = jax.random.key(config.seed)
        train_step = make_train_step(
            split, spec, hyper=hyper, label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
            dropout_key=jax.random.fold_in(seed_key, index), forward=forward, placement=placement,
            augment=augment, num_classes=len(self.class_names),
            augment_key=jax.random.fold_in(jax.random.fold_in(seed_key, 1_000_003), index),
            steps_per_execution=config.steps_per_execution,
        )  # fmt: skip
        log.info(
            "phase %d: %s trainable (%d layers), %d epochs, %s lr %g (%s), %dx%d images", index,
            phase_config.trainable, len(names), phase_config.epochs, phase_config.optimizer,
            phase_config.learning_rate, phase_config.schedule, *size,
        )  # fmt: skip
        eval_step = make_eval_step(split, forward)
        return Phase(
            index, phase_config, epochs, split, spec, hyper, state, train_step, eval_step, train, evals
        )

    def _restore_model(self, inside: bool) -> dict | None:
        """When resuming, put the latest checkpoint's model into ``self.model``; ``inside``: the
        checkpoint is of this phase, so also return its ``state`` (and ``ema``) items."""
        if self.latest is None:
            return None
        targets = {k: self._target(v, replicate=True) for k, v in model_items(self.model).items()}
        restored = self.checkpoints.restore(self.latest, targets)
        set_model_items(self.model, restored)
        return restored if inside else None

    def _restore_state(self, split: SplitModel, state: TrainState, restored: dict) -> TrainState:
        """The state of the checkpoint this phase resumes from (``restored`` has its model)."""
        latest, ema = self.latest, state.ema is not None
        items = {"state": self._target(state_item(state))}
        if ema and self.checkpoints.has_item(latest, "ema"):
            items["ema"] = self._target(state.ema)
        saved = self.checkpoints.restore(latest, items)
        average = saved.get("ema")
        if ema and average is None:  # the run had no ema_decay until now
            log.info("epoch %d's checkpoint has no weight average: it starts there", latest)
            average = jax.tree.map(jnp.copy, split.trainable)
        raw = saved["state"]
        return TrainState(raw["step"], raw["params"], raw["opt_state"], average, state.stats)

    def _phase_inputs(self, index: int, names: Sequence[str]):
        """The phase's train and evaluation inputs and forward pass: images, or the frozen base's
        outputs computed once (head-only phase without augmentation, one process)."""
        head_only = set(names) == set(self.model.head_layers)
        if not (self.config.cache_features and head_only and self.train.augment is None):
            return self.train, self.evals, image_forward
        if jax.process_count() > 1:
            log.info(
                "phase %d: cache_features is off with several processes (the head trains on images)", index
            )
            return self.train, self.evals, image_forward
        train, evals = feature_inputs(self.config, self.model, self.train, self.evals)
        return train, evals, head_forward

    # ------------------------------------------------------------------------------ one epoch
    def train_epoch(self, phase: Phase, epoch: int) -> dict:
        """Train ``phase`` for one epoch; the epoch's ``metrics.csv`` row (no validation yet).
        With ``steps_per_execution`` k > 1 the batches go to the step k at a time (the last group
        may be shorter)."""
        steps, batch_size, k = len(phase.train), self.config.batch_size, self.config.steps_per_execution
        start, metrics = time.perf_counter(), []
        bar = progress(steps * batch_size, f"epoch {epoch}") if self.main else None
        first_step = int(phase.state.step)
        batches = parallel.prefetch_to_device(phase.train.epoch(epoch), size=max(2, k), mesh=self.mesh)
        for group in _groups(batches, k):
            phase.state, m = phase.train_step(phase.state, phase.split.frozen, group if k > 1 else group[0])
            kill_point("train_step", epoch)
            metrics.append({name: m[name] for name in ("loss", "accuracy", "grad_norm")})
            if bar is not None:
                bar.update(batch_size * len(group))
        join = jnp.stack if k == 1 else jnp.concatenate  # scalars, or one array per group
        metrics = {  # one float per step, in one transfer each
            name: np.asarray(jax.device_get(join([m[name] for m in metrics])))
            for name in ("loss", "accuracy", "grad_norm")
        }
        losses, norms = metrics["loss"], metrics["grad_norm"]
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.close()
        self._check_finite(losses, epoch, phase.index, steps)
        scale = lr_scale(phase.state.opt_state)
        lrs = [
            float(phase.spec.learning_rate(phase.hyper, first_step + i)) * scale for i in range(len(losses))
        ]
        for i, (loss, lr, norm) in enumerate(zip(losses, lrs, norms)):
            self.board.scalars(
                epoch * steps + i, {"step/train_loss": loss, "step/learning_rate": lr, "step/grad_norm": norm}
            )
        return {
            "epoch": epoch, "phase": phase.index, "step": int(phase.state.step),
            "train_loss": float(losses.mean()), "train_accuracy": float(metrics["accuracy"].mean()),
            "val_loss": "", "val_accuracy": "", "learning_rate": lrs[-1],
            "images_per_s": steps * batch_size / elapsed, "grad_norm": float(norms.mean()),
        }  # fmt: skip

    def _check_finite(self, losses: np.ndarray, epoch: int, phase: int, steps: int) -> None:
        if np.isfinite(losses).all():
            return
        bad = int(np.argmin(np.isfinite(losses)))
        self.checkpoints.wait()
        good = self.checkpoints.latest_step()
        raise NonFiniteLossError(
            f"loss is {losses[bad]} at step {epoch * steps + bad} (epoch {epoch}, phase {phase}); "
            "nothing was saved for this epoch. Last good checkpoint: "
            + (f"epoch {good} in {self.run_dir.checkpoints}" if good is not None else "none")
            + ". Lower the learning rate or set grad_clip."
        )

    def validate(self, phase: Phase, row: dict) -> None:
        """Loss and accuracy of the ``val`` split (if any) into ``row``, every image once."""
        if "val" not in phase.evals:
            return
        pipeline, state, epoch = phase.evals["val"], phase.state, row["epoch"]
        many = jax.process_count() > 1

        def step(batch):
            kill_point("validate", epoch)
            return phase.eval_step(state.eval_params, phase.split.frozen, batch, stats=state.stats)

        totals = evaluate_batches(
            step,
            pipeline.epoch(0), mesh=self.mesh,
            num_batches=parallel.max_over_processes(len(pipeline)) if many else None,
            expected=None if many else pipeline.num_examples,
        )  # fmt: skip
        row["val_loss"], row["val_accuracy"] = totals.loss, totals.accuracy
        log.debug("epoch %d: validation on %d images", row["epoch"], totals.count)

    # ------------------------------------------------------------------------ after each epoch
    def after_epoch(self, phase: Phase, epoch: int, row: dict) -> None:
        """The hooks, in order: reduce-on-plateau (before saving, so a resume keeps it), the
        metrics row, the checkpoint, TensorBoard and the log, callbacks, early stopping."""
        self.history.append(row)
        self.plateau(phase, epoch)
        if self.main:
            self.run_dir.append_metrics(row)
        kill_point("metrics", epoch)
        self.save(phase, epoch, row)
        self.board.scalars(
            epoch, {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "phase", "step")}
        )
        log.info(
            "epoch %d (phase %d): %s", epoch, phase.index,
            ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
        )  # fmt: skip
        for callback in self.callbacks:
            callback(epoch, dict(row))
        self.early_stopping(epoch)

    def _scores(self, epochs=None) -> list[float]:
        """The monitored validation metric of the epochs so far (of ``epochs`` when given)."""
        return [
            float(h[self.config.monitor])
            for h in self.history
            if h["val_loss"] != "" and (epochs is None or h["epoch"] in epochs)
        ]

    def plateau(self, phase: Phase, epoch: int) -> None:
        """``schedule="plateau"``: the lr scale Keras's ``ReduceLROnPlateau(factor, patience,
        min_delta)`` would have reached after this phase's epochs so far
        (:func:`~imgcls_jax.train.callbacks.plateau_learning_rates` of their scores, so a resumed
        run decides as an uninterrupted one)."""
        scores, config = self._scores(phase.epochs), phase.config
        if config.schedule != "plateau" or not scores or self.history[-1]["val_loss"] == "":
            return
        scale = plateau_learning_rates(
            scores, 1.0, mode_max=self.mode_max, factor=config.plateau_factor,
            patience=config.plateau_patience, min_delta=config.plateau_min_delta,
        )[-1]  # fmt: skip
        if scale != lr_scale(phase.state.opt_state):
            phase.state = phase.state.replace(opt_state=set_lr_scale(phase.state.opt_state, scale))
            log.info("plateau: %s did not improve for %d epochs, lr scale now %g", self.config.monitor,
                     config.plateau_patience, scale)  # fmt: skip

    def save(self, phase: Phase, epoch: int, row: dict) -> None:
        """Checkpoint epoch ``epoch``: the model (with the weight average when there is one), the
        optimizer state and the raw weights; into ``best/`` too when its score improves on every
        earlier epoch's (strictly: of equal scores the first stays, as Keras's
        ``ModelCheckpoint(save_best_only=True)``)."""
        state = phase.state
        nnx.update(self.model, state.eval_params)
        nnx.update(self.model, state.stats)
        items = model_items(self.model)
        items["state"] = state_item(state)
        if state.ema is not None:
            items["ema"] = state.ema
        improved = row["val_loss"] != "" and improvements(self._scores(), mode_max=self.mode_max)[-1]
        best = {"val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"]} if improved else None
        self.checkpoints.save(epoch, items, best)

    def early_stopping(self, epoch: int) -> None:
        """Stop after this epoch where Keras's ``EarlyStopping(patience)`` (``min_delta=0``) would,
        over the run's scores so far (:func:`~imgcls_jax.train.callbacks.early_stopping_epoch`)."""
        scores, patience = self._scores(), self.config.early_stopping_patience
        if not scores or not patience:
            return
        if early_stopping_epoch(scores, mode_max=self.mode_max, patience=patience) is not None:
            best = best_epoch(scores, mode_max=self.mode_max)
            log.info(
                "early stopping after epoch %d (%s last improved %d scored epochs ago)",
                epoch, self.config.monitor, len(scores) - 1 - best,
            )  # fmt: skip
            self.stopped_early = True
