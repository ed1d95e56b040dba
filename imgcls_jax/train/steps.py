"""Pure, jitted train and eval steps over pytrees: the one implementation ``fit``, the README's
examples and the Keras-equality tests all run.

A step is ``state, frozen, batch -> state, metrics`` over a model split by
:func:`~imgcls_jax.train.state.split_model`; ``state`` buffers are donated. Steps are compiled
once per process for each (model graph, optimizer structure, forward pass, placement) and input
shape: the numbers of an :class:`~imgcls_jax.train.optim.OptimizerSpec` (learning rate,
momentum, ...), label smoothing and the EMA decay are float32 *inputs*, so the trials of a search
that differ only in them reuse one executable.

Dropout keys are ``fold_in(dropout_key, step)``, so a step's randomness depends only on the
seed and the step number (a resumed run replays the same masks).

With an exponential moving average of the weights (``TrainState.ema``), each step also updates
the average; evaluation uses it (``TrainState.eval_params``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from imgcls_jax.config import AugmentConfig
from imgcls_jax.data.device_augment import augment_train_batch
from imgcls_jax.train.metrics import confusion_matrix_update, topk_correct
from imgcls_jax.train.optim import OptimizerSpec
from imgcls_jax.train.state import SplitModel, TrainState, ema_update, trained_stats


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, float32[B].

    ``labels``: int[B] class indices, or float[B, K] probabilities (mixup/cutmix).
    ``label_smoothing``: mix the targets with the uniform distribution (Keras's meaning); a
    Python float or a traced scalar (0 leaves the targets exact).
    """
    num_classes = logits.shape[-1]
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def image_forward(model, batch, dropout_key=None):
    """The default forward pass of a step: logits of ``batch["image"]`` (raw uint8 pixels)."""
    return model(batch["image"], dropout_key=dropout_key)


def head_forward(model, batch, dropout_key=None):
    """Forward pass over cached base outputs: logits of ``batch["features"]`` (what
    ``model.pool(model.features(images))`` gives), for training a head on a frozen base."""
    return model.head(batch["features"], dropout_key=dropout_key)


def _hard_labels(labels):
    return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


# Compiled steps shared across runs in one process (e.g. the trials of a search): keyed on
# everything that shapes the program, least recently used dropped beyond _CACHE_SIZE.
_CACHE_SIZE = 32
_JIT_CACHE: OrderedDict = OrderedDict()


def cached_jit(key, build: Callable[[], Callable]) -> Callable:
    """``build()`` (a jitted function) once per hashable ``key`` in this process; jax then
    compiles it once per input shape. A new key compiles anew; equal keys share executables."""
    fn = _JIT_CACHE.get(key)
    if fn is None:
        fn = _JIT_CACHE[key] = build()
        while len(_JIT_CACHE) > _CACHE_SIZE:
            _JIT_CACHE.popitem(last=False)
    else:
        _JIT_CACHE.move_to_end(key)
    return fn


class _Prebuilt:
    """An optax transformation built by the caller (its numbers are constants of the program),
    standing in for an :class:`OptimizerSpec`; compared by identity."""

    def __init__(self, tx: optax.GradientTransformation, schedule: optax.Schedule | None):
        self.tx, self.schedule = tx, schedule

    def build(self, hyper):
        return self.tx

    def learning_rate(self, hyper, step):
        return None if self.schedule is None else self.schedule(step)


def _constrain(tree, placement):
    """Pin ``tree``'s leaves to the shardings of ``placement`` ``(mesh, fsdp_min_size)``."""
    if placement is None:
        return tree
    from imgcls_jax.parallel import tree_shardings

    mesh, fsdp_min_size = placement
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh, fsdp_min_size=fsdp_min_size))


def _train_program(split: SplitModel, optimizer, forward, placement, augment, steps: int = 1) -> Callable:
    """The jitted ``(state, frozen, rest, batch, hyper, keys) -> (state, metrics)``; ``keys``:
    the dropout key and the augmentation key, each folded with the step number. It keeps the
    graph and the trained layers' names of ``split``, never ``split`` itself: the cache of
    compiled steps must not hold a model's arrays alive (tests/test_memory.py).

    ``steps > 1``: ``(state, frozen, rest, batches, count, hyper, keys)`` instead, ``batches`` a
    tuple of ``steps`` batches of which the first ``count`` (a traced int32, so one program serves
    a shorter last group) are trained on, one step each, in an XLA while loop; ``metrics`` then
    have a leading axis of ``steps`` (entries past ``count`` are zeros)."""
    graph, trained = split.train_graph, split.trained

    def step(state: TrainState, frozen, rest, batch, hyper, keys):
        key = jax.random.fold_in(keys[0], state.step)
        if augment is not None:  # (config, num_classes): augment the uint8 batch on the device
            batch = augment_train_batch(batch, jax.random.fold_in(keys[1], state.step), *augment)

        def loss_fn(params):
            # copy=True: fresh Variables at this trace level, so BatchNorm in training mode may
            # update its statistics inside value_and_grad (else a TraceContextError)
            model = nnx.merge(graph, params, state.stats, frozen, rest, copy=True)
            logits = forward(model, batch, key)
            loss = cross_entropy(logits, batch["label"], hyper["label_smoothing"]).mean()
            return loss, (logits, trained_stats(model, trained))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.build(hyper).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema is None else ema_update(state.ema, params, hyper["ema_decay"], state.step)
        new = _constrain(TrainState(state.step + 1, params, opt_state, ema, stats), placement)
        metrics = {
            "loss": loss,
            "accuracy": (jnp.argmax(logits, -1) == _hard_labels(batch["label"])).mean(dtype=jnp.float32),
            "grad_norm": optax.tree.norm(grads),
        }
        lr = optimizer.learning_rate(hyper, state.step)
        if lr is not None:
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return new, metrics

    if steps == 1:
        return jax.jit(step, donate_argnums=0)

    def execution(state: TrainState, frozen, rest, batches, count, hyper, keys):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        shapes = jax.eval_shape(step, state, frozen, rest, batches[0], hyper, keys)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), s.dtype), shapes)

        def body(i, carry):
            state, metrics = carry
            batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacked)
            state, m = step(state, frozen, rest, batch, hyper, keys)
            return state, jax.tree.map(lambda all_, one: all_.at[i].set(one), metrics, m)

        return jax.lax.fori_loop(0, count, body, (state, metrics))

    return jax.jit(execution, donate_argnums=0)


def make_train_step(
    split: SplitModel,
    optimizer: OptimizerSpec | optax.GradientTransformation,
    *,
    hyper: dict | None = None,
    label_smoothing=0.0,
    ema_decay: float | None = None,
    dropout_key=None,
    schedule: optax.Schedule | None = None,
    forward=image_forward,
    placement: tuple | None = None,
    augment: AugmentConfig | None = None,
    num_classes: int | None = None,
    augment_key=None,
    steps_per_execution: int = 1,
) -> Callable:
    """A train step ``(state, frozen, batch) -> (state, metrics)``, compiled once per process for
    each (train graph, optimizer structure, ``forward``, ``placement``, ``steps_per_execution``)
    and input shape.

    Args:
      split: the model split (:func:`~imgcls_jax.train.state.split_model`).
      optimizer: an :class:`OptimizerSpec`, whose numbers ``hyper`` (keys
        :data:`~imgcls_jax.train.optim.HYPER_KEYS`) become float32 inputs, or an optax
        transformation built by the caller (e.g. :func:`~imgcls_jax.train.optim.make_optimizer`),
        whose numbers are constants.
      label_smoothing, ema_decay: float32 inputs too (``ema_decay`` only matters for a state
        with an ``ema``, see :func:`~imgcls_jax.train.state.ema_update`; default 0.999).
      dropout_key: the base key, folded with the step number (default ``key(0)``).
      schedule: with a prebuilt ``optimizer``, its learning-rate schedule, for the metrics.
      forward: :func:`image_forward` (``batch["image"]``) or :func:`head_forward`
        (``batch["features"]``, cached base outputs).
      placement: ``(mesh, fsdp_min_size)`` to pin the new state to the shardings of
        :func:`imgcls_jax.parallel.tree_shardings` (several devices), or None.
      augment: augment each batch on the device first
        (:func:`imgcls_jax.data.device_augment.augment_train_batch`, ``num_classes`` for mixup and
        cutmix), with ``fold_in(augment_key, step)`` (default key: ``key(1)``): the same pixels
        for the same step, so a resumed run replays them.
      steps_per_execution: with ``k > 1``, the function takes a sequence of 1 to ``k`` batches
        instead of one and trains one step on each, in order, in one XLA execution (Keras's
        ``compile(steps_per_execution=k)``); each metric then has a leading axis, one entry per
        batch. A step is the same computation as with ``k = 1``; XLA may fuse it differently
        inside the loop, so the numbers can differ by float rounding. Fewer dispatches, and on
        the CPU the program's temporary buffers are allocated (and their pages first touched)
        once per ``k`` steps (benchmarks/RESULTS.md).

    ``batch``: ``{"image": uint8[B, H, W, 3], "label": int[B] or float[B, K]}``. ``metrics``:
    float32 ``loss``, ``accuracy`` (against the argmax of soft labels), ``grad_norm`` and
    ``learning_rate`` (the scheduled rate of this step, before a plateau scale).
    """
    if isinstance(optimizer, OptimizerSpec):
        numbers = dict(hyper or {})
        missing = [k for k in ("learning_rate",) if k not in numbers]
        if missing:
            raise ValueError(f"make_train_step: an OptimizerSpec needs hyper with {missing}")
        opt = optimizer
    else:
        numbers, opt = {}, _Prebuilt(optimizer, schedule)
    numbers = {
        **numbers,
        "label_smoothing": label_smoothing,
        "ema_decay": 0.999 if ema_decay is None else ema_decay,
    }
    if augment is not None and (forward is not image_forward or num_classes is None):
        raise ValueError("make_train_step: device augmentation needs image batches and num_classes")
    aug = None if augment is None else (augment, num_classes)
    spe = steps_per_execution
    if not isinstance(spe, int) or isinstance(spe, bool) or spe < 1:
        raise ValueError(f"make_train_step: steps_per_execution must be an int >= 1, got {spe!r}")
    jitted = cached_jit(
        ("train", split.train_graph, opt, forward, placement, aug, spe),
        lambda: _train_program(split, opt, forward, placement, aug, spe),
    )
    numbers = {k: jnp.asarray(v, jnp.float32) for k, v in numbers.items()}
    keys = (
        jax.random.key(0) if dropout_key is None else dropout_key,
        jax.random.key(1) if augment_key is None else augment_key,
    )
    rest = split.rest
    if spe == 1:

        def train_step(state, frozen, batch):
            return jitted(state, frozen, rest, batch, numbers, keys)

        train_step.lower = lambda state, frozen, batch: jitted.lower(
            state, frozen, rest, batch, numbers, keys
        )
        return train_step

    def padded(batches):
        if isinstance(batches, dict) or not 1 <= len(batches) <= spe:
            raise ValueError(
                f"a train step with steps_per_execution={spe} takes a sequence of 1 to {spe} batches, got "
                + ("one batch (a dict)" if isinstance(batches, dict) else f"{len(batches)}")
            )
        return (*batches, *[batches[-1]] * (spe - len(batches))), np.int32(len(batches))

    def train_steps(state, frozen, batches):
        group, count = padded(batches)
        state, metrics = jitted(state, frozen, rest, group, count, numbers, keys)
        if count < spe:
            metrics = jax.tree.map(lambda v: v[:count], metrics)
        return state, metrics

    train_steps.lower = lambda state, frozen, batches: jitted.lower(
        state, frozen, rest, *padded(batches), numbers, keys
    )
    return train_steps


def eval_outputs(logits: jax.Array, batch) -> dict:
    """What an eval step returns for ``logits`` float32[B, K] of a padded batch: the logits, and
    sums over the real examples (``batch["mask"]``): ``loss_sum``, ``correct`` (top-1), ``top5``,
    ``count`` and ``confusion`` (int32[K, K], rows true class, columns predicted)."""
    mask, labels = batch["mask"], batch["label"]
    losses = cross_entropy(logits, labels)
    k = logits.shape[-1]
    return {
        "logits": logits,
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": topk_correct(logits, labels, mask, 1),
        "top5": topk_correct(logits, labels, mask, 5),
        "count": jnp.sum(mask, dtype=jnp.int32),
        "confusion": confusion_matrix_update(
            jnp.zeros((k, k), jnp.int32), labels, jnp.argmax(logits, -1), mask
        ),
    }


def make_eval_step(split: SplitModel, forward=image_forward) -> Callable:
    """An eval step ``(params, frozen, batch) -> outputs`` on a padded, masked batch
    (:func:`eval_outputs`), compiled once per (eval graph, ``forward``) and shape in a process.

    ``batch``: ``{"image" (or "features"), "label": int[B], "mask": bool[B]}``; ``params``: the
    trained layers' parameters (e.g. ``state.eval_params``). The trained layers' BatchNorm
    statistics are the split's unless given as ``stats=``.
    """
    graph = split.eval_graph

    def build():
        def step(params, stats, frozen, rest, batch):
            return eval_outputs(forward(nnx.merge(graph, params, stats, frozen, rest), batch), batch)

        return jax.jit(step)

    jitted = cached_jit(("eval", graph, forward), build)
    rest = split.rest

    def eval_step(params, frozen, batch, stats=None):
        return jitted(params, split.stats if stats is None else stats, frozen, rest, batch)

    eval_step.lower = lambda params, frozen, batch: jitted.lower(params, split.stats, frozen, rest, batch)
    return eval_step


def model_state_outputs(state: TrainState) -> dict[str, Any]:
    """The parts of ``state`` that make the model to evaluate and save: eval params and stats."""
    return {"params": state.eval_params, "stats": state.stats}
