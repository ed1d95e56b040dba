"""A model split for functional steps, and the training state that steps carry.

A model is split once into a static graph and four states (see :func:`split_model`):

* ``trainable``: the parameters of the layers being trained (differentiated and updated);
* ``stats``: those layers' BatchNorm statistics (updated by train steps from each batch);
* ``frozen``: everything else a forward pass reads: frozen layers' parameters and statistics
  (never differentiated, no optimizer state, no backward pass through them);
* ``rest``: the remaining variables (dropout RNG streams).

Frozen layers run in inference mode even in a train step (a frozen BatchNorm uses its moving
statistics, as Keras does for ``trainable=False`` layers); trained layers run in training mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """What changes during training: ``step`` (int32, optimizer steps taken), trainable
    ``params``, ``opt_state``, ``ema`` (an exponential moving average of ``params``, same tree,
    or None when the run keeps none) and ``stats`` (the trained layers' BatchNorm statistics; an
    empty state for models without BatchNorm)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any = None
    stats: Any = None

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
    BatchNorm statistics are not averaged: evaluation uses the current ones (as Keras's
    ``use_ema``, which averages trainable variables only).
    """
    step = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(jnp.asarray(decay, jnp.float32), (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


@dataclass
class SplitModel:
    """A model split for functional steps (see the module docstring). ``train_graph`` has the
    trained layers in training mode and the frozen ones in inference mode; ``eval_graph`` has
    every layer in inference mode. ``trained`` names the trained layers."""

    train_graph: Any
    eval_graph: Any
    trainable: nnx.State
    stats: nnx.State
    frozen: nnx.State
    rest: nnx.State
    trained: tuple[str, ...]

    def merge(self, params=None, frozen=None, train: bool = False, stats=None):
        """The model with ``params`` (default: the split's) as its trained parameters."""
        return nnx.merge(
            self.train_graph if train else self.eval_graph,
            self.trainable if params is None else params,
            self.stats if stats is None else stats,
            self.frozen if frozen is None else frozen,
            self.rest,
        )

    def stats_of(self, model) -> nnx.State:
        """The trained layers' BatchNorm statistics of a merged ``model`` (after a forward pass)."""
        return trained_stats(model, self.trained)


def trained_stats(model, trained: Sequence[str]) -> nnx.State:
    """The BatchNorm statistics of the layers named ``trained`` in ``model``: a function of the
    names alone, so a compiled step that calls it holds no model arrays."""
    return nnx.state(model, lambda path, value: isinstance(value, nnx.BatchStat) and path[0] in trained)


def split_model(model, trainable: Sequence[str]) -> SplitModel:
    """Split ``model`` into its trained layers ``trainable`` (names of its weighted layers, e.g.
    ``model.trainable_layers("top:2")``) and the rest; see the module docstring."""
    names = tuple(trainable)
    unknown = sorted(
        set(names) - set(getattr(model, "base_layers", ())) - set(getattr(model, "head_layers", ()))
    )
    if unknown:
        raise ValueError(f"split_model: {unknown} are not layers of this model")

    def is_param(path, value):
        return isinstance(value, nnx.Param) and path[0] in names

    def is_stat(path, value):
        return isinstance(value, nnx.BatchStat) and path[0] in names

    frozen_layers = [n for n in (*model.base_layers, *model.head_layers) if n not in names]
    model.train()
    for name in frozen_layers:  # frozen means inference mode (BatchNorm on its moving statistics)
        getattr(model, name).eval()
    train_graph = nnx.graphdef(model)
    model.eval()
    eval_graph, params, stats, frozen, rest = nnx.split(
        model, is_param, is_stat, nnx.Any(nnx.Param, nnx.BatchStat), ...
    )
    return SplitModel(train_graph, eval_graph, params, stats, frozen, rest, names)


def init_state(
    split: SplitModel, optimizer: optax.GradientTransformation, *, ema: bool = False
) -> TrainState:
    """Step 0 with the optimizer state of the trainable parameters only, and with ``ema``
    a moving average of them that starts at their values.

    The parameters are copied: train steps donate the state, and ``split`` keeps its own.
    """
    params = jax.tree.map(jnp.copy, split.trainable)
    average = jax.tree.map(jnp.copy, split.trainable) if ema else None
    stats = jax.tree.map(jnp.copy, split.stats)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), average, stats)
