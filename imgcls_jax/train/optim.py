"""Optimizers and learning-rate schedules by name, and which parameters a phase trains.

Schedules are optax schedules: callables ``step -> learning rate`` (per optimizer step).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "piecewise", "exponential")
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    end_factor: float = 0.0,
    boundaries: Sequence[float] = (0.5, 0.75),
    factor: float = 0.1,
    decay_rate: float = 0.96,
    decay_steps: int | None = None,
) -> optax.Schedule:
    """A learning-rate schedule, per optimizer step.

    Args:
      name: ``"constant"``; ``"cosine"`` (decay to ``end_factor * learning_rate`` at
        ``total_steps``); ``"piecewise"`` (multiply by ``factor`` at each fraction of
        ``total_steps`` in ``boundaries``: step decay); ``"exponential"`` (multiply by
        ``decay_rate`` every ``decay_steps``, default ``total_steps // 10``, smoothly).
      learning_rate: the peak rate (after warmup).
      total_steps: optimizer steps of the phase, warmup included.
      warmup_steps: linear warmup from 0 to ``learning_rate`` first (all schedules).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    if learning_rate <= 0 or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need learning_rate > 0, total_steps >= 1 and 0 <= warmup_steps <= total_steps; got "
            f"{learning_rate}, {total_steps}, {warmup_steps}"
        )
    steps = max(total_steps - warmup_steps, 1)
    if name == "constant":
        main = optax.constant_schedule(learning_rate)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, steps, alpha=end_factor)
    elif name == "piecewise":
        if any(not 0 < b < 1 for b in boundaries):
            raise ValueError(f"piecewise boundaries are fractions in (0, 1), got {list(boundaries)}")
        main = optax.piecewise_constant_schedule(
            learning_rate, {int(round(b * steps)): factor for b in sorted(boundaries)}
        )
    else:
        main = optax.exponential_decay(learning_rate, decay_steps or max(steps // 10, 1), decay_rate)
    if not warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


class KerasAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
    """Adam scaling exactly as Keras computes it: ``mu / (sqrt(nu) + eps)`` times
    ``sqrt(1 - b2^t) / (1 - b1^t)``, i.e. ``eps`` is added to the *uncorrected* root (optax's
    ``scale_by_adam`` adds it to the bias-corrected one; they differ where gradients are ~eps).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return KerasAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, updates)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, KerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    """An optax optimizer by name: ``"sgd"`` (with ``momentum``/``nesterov``), ``"adam"``,
    ``"adamw"`` (decoupled ``weight_decay``).

    ``weight_decay`` for sgd/adam is L2 added to the gradient (Keras's ``kernel_regularizer``
    style); for adamw it is decoupled (``w -= lr * weight_decay * w``, as Keras's AdamW and
    optax's ``adamw``). ``grad_clip`` clips the global gradient norm first. Adam follows Keras's
    arithmetic exactly (:func:`scale_by_keras_adam`, ``eps`` default 1e-7), so one step equals
    ``keras.optimizers.Adam``'s.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    if weight_decay and name != "adamw":
        parts.append(optax.add_decayed_weights(weight_decay))
    if name == "sgd":
        parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    else:
        parts.append(scale_by_keras_adam(b1, b2, eps))
        if name == "adamw":
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def trainable_layers(model, trainable: str) -> tuple[str, ...]:
    """Names of the layers a phase trains.

    ``trainable``: ``"head"`` (the transfer head, or the Keras top), ``"all"``, or
    ``"top:N"`` (the last N convolution blocks plus the head; ``block5`` is the last block).
    """
    head = tuple(model.head_layers)
    if trainable == "head":
        if not head:
            raise ValueError("trainable='head' but the model has no head (num_classes unset)")
        return head
    base = tuple(model.base_layers)
    if trainable == "all":
        return base + head
    match = re.fullmatch(r"top:(\d+)", trainable)
    if not match:
        raise ValueError(f"trainable must be 'head', 'all' or 'top:N', got {trainable!r}")
    n = int(match.group(1))
    if not 0 <= n <= 5:
        raise ValueError(f"top:N takes N in 0..5 (VGG has 5 blocks), got {n}")
    blocks = {f"block{b}_" for b in range(6 - n, 6)}
    return tuple(name for name in base if name[:7] in blocks) + head


def multiplier_labels(layer_names: Sequence[str], head: Sequence[str]) -> Callable[[str], str]:
    """Label function for ``optax.multi_transform``: ``"head"`` or ``"base"`` by layer name."""
    head = set(head)
    return lambda name: "head" if name in head else "base"


#: The numbers a phase's optimizer takes as traced inputs (float32 scalars), see OptimizerSpec.
HYPER_KEYS = ("learning_rate", "momentum", "weight_decay", "base_lr_multiplier", "grad_clip")


@dataclass(frozen=True)
class OptimizerSpec:
    """The static structure of a phase's optimizer; its numbers come separately, as ``hyper``.

    Two phases with equal specs (hashable) share one compiled train step even when their
    learning rates, momentum, weight decay, base multiplier or clip norm differ: those are
    float32 inputs of the step (``hyper``, keys :data:`HYPER_KEYS`), not constants baked into
    it. What changes the compiled program is here: optimizer and schedule names, steps, warmup
    steps, Nesterov, whether momentum / weight decay / a separate base rate / clipping are on.

    The schedule is ``hyper["learning_rate"] * unit(step)`` with ``unit`` the schedule of peak 1
    (every schedule of :func:`make_schedule` is linear in its peak rate). The base layers (not
    in ``head_layers``) get ``hyper["base_lr_multiplier"]`` times it when ``base_multiplier``.
    A final injectable ``scale`` (1.0) carries the reduce-on-plateau factor in the state.
    """

    name: str
    schedule: str
    total_steps: int
    warmup_steps: int = 0
    nesterov: bool = False
    momentum: bool = True
    weight_decay: bool = False
    base_multiplier: bool = False
    head_layers: tuple[str, ...] = ()
    grad_clip: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        self.unit_schedule()  # checks the schedule name and steps now, not inside a trace

    def unit_schedule(self) -> optax.Schedule:
        return make_schedule(self.schedule, 1.0, self.total_steps, warmup_steps=self.warmup_steps)

    def build(self, hyper: dict) -> optax.GradientTransformation:
        """The optimizer for ``hyper`` (floats or traced float32 scalars; see the class docstring)."""
        unit = self.unit_schedule()

        def head_lr(step):
            return hyper["learning_rate"] * unit(step)

        def base_lr(step):
            return hyper["learning_rate"] * hyper["base_lr_multiplier"] * unit(step)

        if self.base_multiplier:
            head = set(self.head_layers)

            def labels(params):
                return jax.tree_util.tree_map_with_path(
                    lambda path, _: "head" if _first_key(path) in head else "base", params
                )

            inner = optax.multi_transform(
                {"head": self._core(head_lr, hyper), "base": self._core(base_lr, hyper)}, labels
            )
        else:
            inner = self._core(head_lr, hyper)
        parts = [optax.clip_by_global_norm(hyper["grad_clip"])] if self.grad_clip else []
        return optax.chain(*parts, inner, optax.inject_hyperparams(optax.scale)(step_size=1.0))

    def _core(self, lr, hyper) -> optax.GradientTransformation:
        parts = []
        if self.weight_decay and self.name != "adamw":
            parts.append(optax.add_decayed_weights(hyper["weight_decay"]))
        if self.name == "sgd":
            momentum = hyper["momentum"] if self.momentum else None
            parts.append(optax.sgd(lr, momentum=momentum, nesterov=self.nesterov))
        else:
            parts.append(scale_by_keras_adam())
            if self.name == "adamw":
                parts.append(optax.add_decayed_weights(hyper["weight_decay"]))
            parts.append(optax.scale_by_learning_rate(lr))
        return optax.chain(*parts)


def _first_key(path) -> str:
    entry = path[0]
    return str(getattr(entry, "key", getattr(entry, "name", entry)))
