"""Pure, jitted train and eval steps over pytrees.

A model is split once into a static ``graphdef`` and three states: the trainable parameters
(differentiated and updated), the frozen parameters (passed in, never differentiated: no
optimizer state and no backward pass through them) and the rest (dropout RNG streams). A step
is ``state, frozen, batch -> state, metrics``; ``state`` buffers are donated.

Dropout keys are ``fold_in(dropout_key, step)``, so a step's randomness depends only on the
seed and the step number (a resumed run replays the same masks).

With an exponential moving average of the weights (``TrainState.ema``, see :func:`ema_update`),
each step also updates the average; evaluation uses it (``TrainState.eval_params``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """What changes during training: ``step`` (int32, optimizer steps taken), trainable
    ``params``, ``opt_state``, and ``ema``: an exponential moving average of ``params`` (same
    tree), or None when the run keeps none."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any = None

    @property
    def eval_params(self):
        """The trainable parameters to evaluate, predict and save as the model: ``ema`` when the
        run keeps one, else ``params``."""
        return self.params if self.ema is None else self.ema


def ema_update(ema, params, decay, step):
    """The moving average after one more optimizer step: ``d * ema + (1 - d) * params``.

    ``decay``: the target decay (float, e.g. 0.999; a traced scalar is fine). ``step``: the number
    of updates already averaged (0 for the first). The decay used is
    ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``): small at first, so early in a phase the average does not stay near its
    initial weights. The cap ``decay`` applies from step ``(10 decay - 1) / (1 - decay)`` on
    (8,990 for 0.999, 890 for 0.99); before that, the weights of the last ``k`` of ``t`` steps
    carry about ``1 - ((t - k) / t)^9`` of the average (the last tenth of the steps ~61%).
    """
    step = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(jnp.asarray(decay, jnp.float32), (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


@dataclass
class SplitModel:
    """A model split for functional steps (see the module docstring)."""

    train_graph: Any
    eval_graph: Any
    trainable: nnx.State
    frozen: nnx.State
    rest: nnx.State
    layer_names: tuple[str, ...]

    def merge(self, params=None, frozen=None, train: bool = False):
        graph = self.train_graph if train else self.eval_graph
        return nnx.merge(
            graph,
            self.trainable if params is None else params,
            self.frozen if frozen is None else frozen,
            self.rest,
        )


def split_model(model, trainable: Sequence[str]) -> SplitModel:
    """Split ``model`` into trainable (the named layers' parameters), frozen and rest."""
    names = tuple(trainable)

    def is_trainable(path, value):
        return isinstance(value, nnx.Param) and path[0] in names

    model.train()
    train_graph = nnx.graphdef(model)
    model.eval()
    eval_graph, params, frozen, rest = nnx.split(model, is_trainable, nnx.Param, ...)
    return SplitModel(train_graph, eval_graph, params, frozen, rest, names)


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


def make_train_step(
    split: SplitModel,
    optimizer: optax.GradientTransformation,
    *,
    label_smoothing=0.0,
    dropout_key=None,
    schedule=None,
    forward=image_forward,
    ema_decay: float = 0.999,
):
    """A jitted ``(state, frozen, batch) -> (state, metrics)``.

    ``batch``: ``{"image": uint8[B, H, W, 3], "label": int[B] or float[B, K]}`` (or
    ``"features"`` in place of ``"image"`` with ``forward=head_forward``).
    ``metrics``: float32 ``loss``, ``accuracy`` (against the argmax of soft labels),
    ``grad_norm`` and ``learning_rate`` (when ``schedule`` is given) of this step.
    ``ema_decay``: the decay of ``state.ema`` (see :func:`ema_update`); unused when ``state.ema``
    is None.
    """
    dropout_key = jax.random.key(0) if dropout_key is None else dropout_key

    def step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(dropout_key, state.step)

        def logits_of(params):
            return forward(split.merge(params, frozen, train=True), batch, key)

        state, metrics = optimizer_step(state, optimizer, batch, logits_of, label_smoothing, ema_decay)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step - 1), jnp.float32)
        return state, metrics

    return jax.jit(step, donate_argnums=0)


def optimizer_step(state: TrainState, optimizer, batch, logits_of, label_smoothing=0.0, ema_decay=0.999):
    """One step of ``optimizer`` on the cross-entropy of ``logits_of(params)`` against
    ``batch["label"]``: ``(next state, {"loss", "accuracy", "grad_norm"})``, float32 scalars.
    ``label_smoothing`` and ``ema_decay`` may be traced values (0 leaves the targets exact;
    ``ema_decay`` only matters when ``state.ema`` is not None)."""

    def loss_fn(params):
        logits = logits_of(params)
        return cross_entropy(logits, batch["label"], label_smoothing).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else ema_update(state.ema, params, ema_decay, state.step)
    correct = jnp.argmax(logits, -1) == _hard_labels(batch["label"])
    metrics = {
        "loss": loss,
        "accuracy": correct.mean(dtype=jnp.float32),
        "grad_norm": optax.tree.norm(grads),
    }
    return TrainState(state.step + 1, params, opt_state, ema), metrics


def make_eval_step(split: SplitModel, forward=image_forward):
    """A jitted ``(params, frozen, batch) -> outputs`` on a padded, masked batch.

    ``batch``: ``{"image", "label": int[B], "mask": bool[B]}``. Returns ``logits`` float32[B, K],
    and sums over the real examples: ``loss_sum``, ``correct`` (top-1), ``count``.
    """

    def step(params, frozen, batch):
        return eval_outputs(forward(split.merge(params, frozen, train=False), batch), batch)

    return jax.jit(step)


def eval_outputs(logits: jax.Array, batch) -> dict:
    """What an eval step returns for ``logits`` float32[B, K] of a padded batch: the logits, and
    sums over the real examples (``batch["mask"]``): ``loss_sum``, ``correct`` (top-1), ``count``."""
    mask = batch["mask"]
    losses = cross_entropy(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    return {
        "logits": logits,
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(correct, dtype=jnp.int32),
        "count": jnp.sum(mask, dtype=jnp.int32),
    }


def init_state(
    split: SplitModel, optimizer: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """Step 0 with the optimizer state of the trainable parameters only, and with ``ema``
    a moving average of them that starts at their values.

    The parameters are copied: train steps donate the state, and ``split`` keeps its own.
    """
    params = jax.tree.map(jnp.copy, split.trainable)
    average = jax.tree.map(jnp.copy, split.trainable) if ema else None
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), average)


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


def cached_train_step(split: SplitModel, spec, hyper: dict, *, dropout_key, forward=image_forward):
    """A ``(state, frozen, batch) -> (state, metrics)`` step like :func:`make_train_step`, but
    compiled once per (train graph, optimizer ``spec``, ``forward``, input shapes) in a process:
    runs that differ only in the numbers of ``hyper`` reuse the executable.

    ``spec``: an :class:`imgcls_jax.train.optim.OptimizerSpec`. ``hyper``: its numbers
    (:data:`~imgcls_jax.train.optim.HYPER_KEYS`) plus ``label_smoothing`` (and ``ema_decay`` for a
    state with an ``ema``); all become float32 inputs. ``dropout_key``: the base key (folded with
    the step number). ``metrics`` as :func:`make_train_step` with ``learning_rate``: the scheduled
    rate of this step.
    """
    graph = split.train_graph

    def build():
        def step(state: TrainState, frozen, rest, batch, hyper, dropout_key):
            key = jax.random.fold_in(dropout_key, state.step)

            def logits_of(params):
                return forward(nnx.merge(graph, params, frozen, rest), batch, key)

            lr = hyper["learning_rate"] * spec.unit_schedule()(state.step)
            state, metrics = optimizer_step(
                state, spec.build(hyper), batch, logits_of, hyper["label_smoothing"],
                hyper["ema_decay"] if state.ema is not None else 0.0,
            )  # fmt: skip
            return state, {**metrics, "learning_rate": lr}

        return jax.jit(step, donate_argnums=0)

    jitted = cached_jit(("train", graph, spec, forward), build)
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
    rest = split.rest

    def train_step(state, frozen, batch):
        return jitted(state, frozen, rest, batch, hyper, dropout_key)

    return train_step


def cached_eval_step(split: SplitModel, forward=image_forward):
    """:func:`make_eval_step`, compiled once per (eval graph, ``forward``, shapes) in a process."""
    graph = split.eval_graph

    def build():
        def step(params, frozen, rest, batch):
            return eval_outputs(forward(nnx.merge(graph, params, frozen, rest), batch), batch)

        return jax.jit(step)

    jitted = cached_jit(("eval", graph, forward), build)
    rest = split.rest
    return lambda params, frozen, batch: jitted(params, frozen, rest, batch)
