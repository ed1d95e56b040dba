"""``fit(config)``: the training loop over phases and epochs, with orbax checkpoints and resume.

Run directory layout::

    run_dir/config.json      the TrainConfig (the run can be repeated from it)
    run_dir/manifest.csv     every image with its label and split
    run_dir/metrics.csv      one row per epoch (phase, losses, accuracies, lr, images/s)
    run_dir/tensorboard/     TensorBoard events: per-step loss and learning rate, per-epoch metrics
    run_dir/checkpoints/     orbax: the latest ``keep_checkpoints`` epochs (params + optimizer state)
    run_dir/best/            orbax: the parameters of the best epoch by ``config.monitor``

With ``config.ema_decay`` set, each phase keeps an exponential moving average of its trainable
weights (:func:`imgcls_jax.train.steps.ema_update`, starting at the phase's initial weights);
validation, the saved ``params`` (latest and best) and the next phase's starting point are the
average, as with Keras's ``use_ema``; the raw weights and the average both resume exactly.

Resuming (``resume=True``, the default) restores the latest checkpoint and continues with the
next epoch. Epoch ``e``'s data order and augmentation and every step's dropout mask depend
only on the seed, ``e`` and the step, so a run killed at any point and resumed ends with the
same parameters as an uninterrupted one.

Several processes (``jax.distributed``, see :mod:`imgcls_jax.parallel`): every process runs the
same ``fit(config)``. ``batch_size`` is the global batch; each process reads a disjoint, equal
share of the train images and a share of each evaluation split (every image counted once, the
numbers identical on all processes). Parameters stay replicated over one mesh of all devices.
Process 0 alone writes ``config.json``, the manifest, ``metrics.csv``, TensorBoard events and the
progress bar; every process takes part in the orbax checkpoint saves and restores.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from imgcls_jax.config import PhaseConfig, TrainConfig
from imgcls_jax.train.inputs import feature_inputs, multi_process, run_batch_sharding, run_inputs
from imgcls_jax.train.monitor import NoBoard, TensorBoard, progress
from imgcls_jax.train.optim import OptimizerSpec, trainable_layers
from imgcls_jax.train.steps import (
    cached_eval_step,
    cached_train_step,
    head_forward,
    image_forward,
    init_state,
    split_model,
)

log = logging.getLogger(__name__)

METRIC_FIELDS = [
    "epoch", "phase", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "images_per_s",
]  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    model: object = None
    class_names: list[str] = field(default_factory=list)
    stopped_early: bool = False


def evaluate_pipeline(split, params, frozen, pipeline, forward=image_forward) -> dict[str, float]:
    """Mean loss and top-1 accuracy over every image of ``pipeline`` (padding masked).

    With several processes, ``pipeline`` is this process's share; every process must call this,
    and all return the totals over every process's images."""
    from imgcls_jax.data import prefetch_to_device

    step = cached_eval_step(split, forward)
    loss, correct, count = 0.0, 0, 0
    batches = pipeline.epoch(0)
    if multi_process():
        from imgcls_jax.parallel import masked_tail, max_over_processes

        batches = masked_tail(batches, max_over_processes(len(pipeline)))
    for batch in prefetch_to_device(batches, sharding=run_batch_sharding()):
        out = step(params, frozen, batch)
        loss += float(out["loss_sum"])
        correct += int(out["correct"])
        count += int(out["count"])
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1), "count": count}


def phase_optimizer(
    phase: PhaseConfig,
    steps_per_epoch: int,
    head_layers,
    grad_clip=None,
    label_smoothing: float = 0.0,
    ema_decay: float | None = None,
) -> tuple[OptimizerSpec, dict[str, float], optax.Schedule]:
    """The phase's optimizer as ``(spec, hyper, schedule)``: the static structure, its numbers
    (``hyper``, passed to the compiled step as float32 inputs, so phases and runs that differ only
    in these numbers share one executable) and the learning-rate schedule (per step, for logs).

    The base gets ``base_lr_multiplier`` times the head's rate; a final injectable ``scale`` (1.0)
    carries the reduce-on-plateau factor in the optimizer state.
    """
    if not phase.learning_rate > 0:
        raise ValueError(f"PhaseConfig.learning_rate must be > 0, got {phase.learning_rate}")
    total, sgd = phase.epochs * steps_per_epoch, phase.optimizer == "sgd"
    spec = OptimizerSpec(
        name=phase.optimizer, schedule="constant" if phase.schedule == "plateau" else phase.schedule,
        total_steps=total, warmup_steps=int(round(phase.warmup_epochs * steps_per_epoch)),
        nesterov=sgd and bool(phase.nesterov), momentum=sgd and bool(phase.momentum),
        weight_decay=bool(phase.weight_decay),
        base_multiplier=phase.base_lr_multiplier != 1.0, head_layers=tuple(head_layers),
        grad_clip=bool(grad_clip),
    )  # fmt: skip
    hyper = {
        "learning_rate": phase.learning_rate, "momentum": phase.momentum, "weight_decay": phase.weight_decay,
        "base_lr_multiplier": phase.base_lr_multiplier, "grad_clip": grad_clip or 0.0,
        "label_smoothing": label_smoothing, "ema_decay": ema_decay or 0.0,
    }  # fmt: skip
    unit = spec.unit_schedule()
    return spec, hyper, lambda step: phase.learning_rate * unit(step)


def _plateau_scale(state) -> float:
    return float(state.opt_state[-1].hyperparams["step_size"])


def _set_plateau_scale(state, value: float):
    inj = state.opt_state[-1]
    hyper = {**inj.hyperparams, "step_size": jnp.asarray(value, inj.hyperparams["step_size"].dtype)}
    return state.replace(opt_state=(*state.opt_state[:-1], inj._replace(hyperparams=hyper)))


def _typed(row: dict) -> dict:
    """A ``metrics.csv`` row with the types of a fresh one: ints, floats, "" where empty."""
    ints = ("epoch", "phase", "step")
    return {k: v if v == "" else int(v) if k in ints else float(v) for k, v in row.items()}


def _saved_state(state) -> dict:
    """The checkpoint item ``state``: step, raw trainable parameters and optimizer state (the
    layout of every version; a moving average is the separate item ``ema``)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _better(score, best, mode_max: bool) -> bool:
    return best is None or (score > best if mode_max else score < best)


def fit(config: TrainConfig, *, resume: bool = True, callbacks: Sequence[Callable] = ()) -> FitResult:
    """Train ``config``'s model on its data, phase by phase; see the module docstring.

    ``callbacks``: called as ``callback(epoch, row)`` after each epoch is checkpointed and
    logged (``row``: that epoch's ``metrics.csv`` values). An exception raised by a callback
    (e.g. ``optuna.TrialPruned``) stops the run and propagates; checkpoints stay consistent.
    """
    import orbax.checkpoint as ocp

    from imgcls_jax.models import create_model

    _check_devices(config)
    main = jax.process_index() == 0
    run_dir = Path(config.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        config.to_json(run_dir / "config.json")
    class_names, train, evals = run_inputs(config, run_dir, write=main)
    model = create_model(
        config.model, num_classes=len(class_names), weights=config.weights, pooling=config.pooling,
        head_units=config.head_units, dropout=config.dropout, dtype=config.dtype, seed=config.seed,
        input_shape=(config.image_size_at(0),) * 2 + (3,), kernel_init=config.kernel_init,
    )  # fmt: skip
    if multi_process():  # every array a global one on the mesh: steps and orbax see only those
        nnx.update(model, _replicate(nnx.state(model)))
    mode_max = config.monitor == "val_accuracy"
    # Several processes: synchronous saves. Two managers finalizing in background threads at once
    # collide on orbax's multi-host barrier names ("... is already ongoing").
    sync = {"enable_async_checkpointing": False} if multi_process() else {}
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, **sync),
    )
    best_manager = ocp.CheckpointManager(
        run_dir / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[config.monitor], best_mode="max" if mode_max else "min", **sync
        ),
    )
    result = FitResult(run_dir, class_names=class_names, model=model)
    metrics_path = run_dir / "metrics.csv"
    latest = manager.latest_step() if resume else None
    if latest is None:
        if main:
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(METRIC_FIELDS)
    else:
        with open(metrics_path, newline="") as f:
            result.history = [_typed(row) for row in csv.DictReader(f) if int(row["epoch"]) <= latest]
        log.info("resuming %s after epoch %d", run_dir, latest)
    board = TensorBoard(run_dir / "tensorboard") if main else NoBoard()
    try:
        _train_phases(
            config, model, train, evals, manager, best_manager, board, result, latest, mode_max, callbacks
        )
    finally:
        manager.wait_until_finished()
        best_manager.wait_until_finished()
        manager.close()
        best_manager.close()
        board.close()
    return result


def _check_devices(config: TrainConfig) -> None:
    """``fit`` runs data-parallel over every device of every process; the (global) batches must
    divide over them. Each process then feeds ``batch / devices x its devices`` images a step,
    which divides over its own devices."""
    devices, processes = jax.device_count(), jax.process_count()
    where = f" of {processes} processes" if processes > 1 else ""
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(config, name)
        if value is not None and value % devices:
            raise ValueError(
                f"TrainConfig.{name}={value} does not divide over the {devices} devices{where}; "
                f"use a multiple of {devices} (it is the global batch, split over the devices)"
            )


def _replicate(tree):
    """Put ``tree`` on every device (replicated), so jitted steps run data-parallel over all of
    them with the batch sharded on its leading axis (see :mod:`imgcls_jax.parallel`)."""
    if jax.device_count() == 1:
        return tree
    from imgcls_jax import parallel

    return parallel.place(tree, parallel.replicated(parallel.make_mesh()))


def _restore_target(tree):
    """What orbax restores ``tree`` as: ``tree`` itself on one process, else abstract arrays
    replicated over the mesh of every process's devices."""
    if not multi_process():
        return tree
    from imgcls_jax import parallel

    return parallel.restore_target(tree, parallel.replicated(parallel.make_mesh()))


def _train_phases(
    config, model, train, evals, manager, best_manager, board, result, latest, mode_max, callbacks
):
    import orbax.checkpoint as ocp

    steps_per_epoch = len(train)
    epoch0 = 0
    history = {int(h["epoch"]): h for h in result.history}
    for phase_index, phase in enumerate(config.phases):
        phase_epochs = range(epoch0, epoch0 + phase.epochs)
        epoch0 += phase.epochs
        if latest is not None and phase_epochs[-1] <= latest:
            continue  # finished before the interruption; its parameters come with the restore below
        names = trainable_layers(model, phase.trainable)
        split = split_model(model, names)
        spec, hyper, schedule = phase_optimizer(
            phase, steps_per_epoch, model.head_layers, config.grad_clip, config.label_smoothing,
            config.ema_decay,
        )  # fmt: skip
        optimizer = spec.build(hyper)
        ema = config.ema_decay is not None
        state = init_state(split, optimizer, ema=ema)
        if latest is not None:  # resume: parameters, and the optimizer state inside this phase
            params_target = _restore_target(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            items = {"params": ocp.args.StandardRestore(params_target)}
            inside = latest >= phase_epochs[0]
            if inside:
                items["state"] = ocp.args.StandardRestore(_restore_target(_saved_state(state)))
                if ema and (Path(manager.directory) / str(latest) / "ema").is_dir():
                    items["ema"] = ocp.args.StandardRestore(_restore_target(state.ema))
            restored = manager.restore(latest, args=ocp.args.Composite(**items))
            params_state = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(params_state, restored["params"])
            nnx.update(model, params_state)
            split = split_model(model, names)
            if not inside:
                state = init_state(split, optimizer, ema=ema)
            else:
                saved, average = restored["state"], restored["ema"] if "ema" in items else None
                if ema and average is None:  # the run had no ema_decay until now
                    log.info("epoch %d's checkpoint has no weight average: it starts there", latest)
                    average = jax.tree.map(jnp.copy, split.trainable)
                state = type(state)(saved["step"], saved["params"], saved["opt_state"], average)
        state, split.frozen = _replicate(state), _replicate(split.frozen)
        size = (config.phase_image_size(phase_index),) * 2
        train, evals = train.resized(size), {name: p.resized(size) for name, p in evals.items()}
        phase_train, phase_evals, forward = train, evals, image_forward
        features = config.cache_features and set(names) == set(model.head_layers) and train.augment is None
        if features and multi_process():
            log.info(
                "phase %d: cache_features is off with several processes (the head trains on images)",
                phase_index,
            )
        elif features:
            phase_train, phase_evals = feature_inputs(config, model, train, evals)
            forward = head_forward
        step_fn = cached_train_step(
            split, spec, hyper, forward=forward,
            dropout_key=jax.random.fold_in(jax.random.key(config.seed), phase_index),
        )  # fmt: skip
        log.info(
            "phase %d: %s trainable (%d layers), %d epochs, %s lr %g (%s), %dx%d images", phase_index,
            phase.trainable, len(names), phase.epochs, phase.optimizer, phase.learning_rate,
            phase.schedule, *size,
        )  # fmt: skip
        for epoch in phase_epochs:
            if latest is not None and epoch <= latest:
                continue
            state, row = _train_epoch(
                config, phase_train, phase_evals, split, step_fn, forward, state, schedule, epoch,
                phase_index, manager, board,
            )  # fmt: skip
            history[epoch] = row
            if phase.schedule == "plateau" and row["val_loss"] != "":  # before saving: resume keeps it
                phase_scores = [float(history[e][config.monitor]) for e in phase_epochs if e in history]
                stale = (
                    len(phase_scores)
                    - 1
                    - int(np.argmax(phase_scores) if mode_max else np.argmin(phase_scores))
                )
                if stale and stale % phase.plateau_patience == 0:
                    state = _set_plateau_scale(state, _plateau_scale(state) * phase.plateau_factor)
                    log.info(
                        "plateau: %s flat for %d epochs, lr scale now %g",
                        config.monitor,
                        stale,
                        _plateau_scale(state),
                    )
            nnx.update(model, state.eval_params)
            full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            items = {
                "params": ocp.args.StandardSave(full),
                "state": ocp.args.StandardSave(_saved_state(state)),
            }
            if state.ema is not None:
                items["ema"] = ocp.args.StandardSave(state.ema)
            manager.save(epoch, args=ocp.args.Composite(**items))
            if row["val_loss"] != "":
                best_manager.save(
                    epoch, args=ocp.args.Composite(params=ocp.args.StandardSave(full)),
                    metrics={"val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"]},
                )  # fmt: skip
            if jax.process_index() == 0:
                with open(result.run_dir / "metrics.csv", "a", newline="") as f:
                    csv.writer(f).writerow([row[k] for k in METRIC_FIELDS])
            result.history.append(row)
            board.scalars(
                epoch, {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "phase", "step")}
            )
            for callback in callbacks:
                callback(epoch, dict(row))
            log.info(
                "epoch %d (phase %d): %s", epoch, phase_index,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
            )  # fmt: skip
            scores = [
                float(history[e][config.monitor]) for e in sorted(history) if history[e]["val_loss"] != ""
            ]
            if not scores or not config.early_stopping_patience:
                continue
            since_best = len(scores) - 1 - int(np.argmax(scores) if mode_max else np.argmin(scores))
            if since_best >= config.early_stopping_patience:
                log.info(
                    "early stopping after epoch %d (%s flat for %d epochs)", epoch, config.monitor, since_best
                )
                result.stopped_early = True
                return
        latest = None


def _train_epoch(
    config, train, evals, split, step_fn, forward, state, schedule, epoch, phase_index, manager, board
):
    from imgcls_jax.data import prefetch_to_device

    steps = len(train)
    start, losses, accs = time.perf_counter(), [], []
    bar = progress(steps * config.batch_size, f"epoch {epoch}") if jax.process_index() == 0 else None
    first_step = int(state.step)
    for batch in prefetch_to_device(train.epoch(epoch), sharding=run_batch_sharding()):
        state, m = step_fn(state, split.frozen, batch)
        losses.append(m["loss"])
        accs.append(m["accuracy"])
        if bar is not None:
            bar.update(config.batch_size)
    losses = np.asarray(jax.device_get(jnp.stack(losses)))
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if not np.isfinite(losses).all():
        bad = int(np.argmin(np.isfinite(losses)))
        manager.wait_until_finished()
        good = manager.latest_step()
        raise NonFiniteLossError(
            f"loss is {losses[bad]} at step {epoch * steps + bad} (epoch {epoch}, phase {phase_index}); "
            "nothing was saved for this epoch. Last good checkpoint: "
            + (f"epoch {good} in {manager.directory}" if good is not None else "none")
            + ". Lower the learning rate or set grad_clip."
        )
    scale = _plateau_scale(state)
    lrs = [float(schedule(first_step + i)) * scale for i in range(len(losses))]
    for i, (loss, lr) in enumerate(zip(losses, lrs)):
        board.scalars(epoch * steps + i, {"step/train_loss": loss, "step/learning_rate": lr})
    row = {
        "epoch": epoch, "phase": phase_index, "step": int(state.step),
        "train_loss": float(losses.mean()), "train_accuracy": float(np.mean(jax.device_get(accs))),
        "learning_rate": lrs[-1], "images_per_s": steps * config.batch_size / elapsed,
        "val_loss": "", "val_accuracy": "",
    }  # fmt: skip
    if "val" in evals:
        val = evaluate_pipeline(split, state.eval_params, split.frozen, evals["val"], forward)
        row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        log.debug("epoch %d: validation on %d images", epoch, val["count"])
    return state, row
