"""Optimizers and learning-rate schedules by name: one way to build them.

Schedules are optax schedules: callables ``step -> learning rate`` (per optimizer step). Every
optimizer, whether a phase of ``fit`` or :func:`make_optimizer` called by hand, is built by
:meth:`OptimizerSpec.build`: a static structure (hashable, so compiled steps are shared) and its
numbers (``hyper``: floats or traced float32 scalars).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from imgcls_jax.config import OPTIMIZERS, SCHEDULES, PhaseConfig


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


#: The numbers an optimizer takes as traced inputs (float32 scalars), see OptimizerSpec.
HYPER_KEYS = ("learning_rate", "momentum", "weight_decay", "base_lr_multiplier", "grad_clip")


@dataclass(frozen=True)
class OptimizerSpec:
    """The static structure of an optimizer; its numbers come separately, as ``hyper``.

    Two optimizers with equal specs (hashable) share one compiled train step even when their
    learning rates, momentum, weight decay, base multiplier or clip norm differ: those are
    float32 inputs of the step (``hyper``, keys :data:`HYPER_KEYS`), not constants baked into
    it. What changes the compiled program is here: optimizer and schedule names, steps, warmup
    steps, Nesterov, Adam's betas and epsilon, whether momentum / weight decay / a separate base
    rate / clipping are on.

    The schedule is ``hyper["learning_rate"] * unit(step)`` with ``unit`` the schedule of peak 1
    (every schedule of :func:`make_schedule` is linear in its peak rate). The base layers (not in
    ``head_layers``) get ``hyper["base_lr_multiplier"]`` times it when ``base_multiplier``.

    The chain is ``[clip] -> core (or base/head cores) -> lr scale``: the last transformation is
    an injectable ``scale`` (1.0) that carries the reduce-on-plateau factor in the optimizer
    state (read and set it with :func:`lr_scale` and :func:`set_lr_scale`).

    ``weight_decay`` for sgd/adam is L2 added to the gradient (Keras's ``kernel_regularizer``
    style); for adamw it is decoupled (``w -= lr * weight_decay * w``, as Keras's AdamW and
    optax's ``adamw``). Adam follows Keras's arithmetic exactly (:func:`scale_by_keras_adam`).
    """

    name: str
    schedule: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    nesterov: bool = False
    momentum: bool = True
    weight_decay: bool = False
    base_multiplier: bool = False
    head_layers: tuple[str, ...] = ()
    grad_clip: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        self.unit_schedule()  # checks the schedule name and steps now, not inside a trace

    @classmethod
    def for_phase(
        cls, phase: PhaseConfig, steps_per_epoch: int, head_layers: Sequence[str], grad_clip=None
    ) -> tuple[OptimizerSpec, dict[str, float]]:
        """A phase's optimizer as ``(spec, hyper)`` (``plateau`` phases run a constant schedule
        whose lr scale the loop lowers)."""
        total, sgd = phase.epochs * steps_per_epoch, phase.optimizer == "sgd"
        spec = cls(
            name=phase.optimizer, schedule="constant" if phase.schedule == "plateau" else phase.schedule,
            total_steps=total, warmup_steps=int(round(phase.warmup_epochs * steps_per_epoch)),
            nesterov=sgd and bool(phase.nesterov), momentum=sgd and bool(phase.momentum),
            weight_decay=bool(phase.weight_decay), base_multiplier=phase.base_lr_multiplier != 1.0,
            head_layers=tuple(head_layers), grad_clip=bool(grad_clip),
        )  # fmt: skip
        hyper = {
            "learning_rate": phase.learning_rate, "momentum": phase.momentum,
            "weight_decay": phase.weight_decay, "base_lr_multiplier": phase.base_lr_multiplier,
            "grad_clip": grad_clip or 0.0,
        }  # fmt: skip
        return spec, hyper

    def unit_schedule(self) -> optax.Schedule:
        return make_schedule(self.schedule, 1.0, self.total_steps, warmup_steps=self.warmup_steps)

    def learning_rate(self, hyper: dict, step, schedule: optax.Schedule | None = None):
        """The head's scheduled learning rate at ``step`` (before any plateau scale)."""
        return schedule(step) if schedule is not None else hyper["learning_rate"] * self.unit_schedule()(step)

    def build(self, hyper: dict, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
        """The optimizer for ``hyper`` (floats or traced float32 scalars; see the class docstring).
        ``schedule``: a learning-rate schedule of its own in place of
        ``hyper["learning_rate"] * unit(step)`` (:func:`make_optimizer` with a schedule)."""

        def head_lr(step):
            return self.learning_rate(hyper, step, schedule)

        def base_lr(step):
            return head_lr(step) * hyper["base_lr_multiplier"]

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
            parts.append(scale_by_keras_adam(self.b1, self.b2, self.eps))
            if self.name == "adamw":
                parts.append(optax.add_decayed_weights(hyper["weight_decay"]))
            parts.append(optax.scale_by_learning_rate(lr))
        return optax.chain(*parts)


def _first_key(path) -> str:
    entry = path[0]
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


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
    ``"adamw"`` (decoupled ``weight_decay``), built by :meth:`OptimizerSpec.build` as ``fit``
    builds its phases' optimizers (see there for the meaning of ``weight_decay``).

    ``learning_rate``: a constant or an optax schedule (per step). ``grad_clip`` clips the global
    gradient norm first. Adam follows Keras's arithmetic exactly (``eps`` default 1e-7, Keras's),
    so its steps equal ``keras.optimizers.Adam``'s.
    """
    schedule = learning_rate if callable(learning_rate) else None
    spec = OptimizerSpec(
        name, nesterov=name == "sgd" and nesterov, momentum=name == "sgd" and bool(momentum),
        weight_decay=bool(weight_decay), grad_clip=bool(grad_clip), b1=b1, b2=b2, eps=eps,
    )  # fmt: skip
    hyper = {
        "learning_rate": 0.0 if schedule is not None else learning_rate, "momentum": momentum,
        "weight_decay": weight_decay, "base_lr_multiplier": 1.0, "grad_clip": grad_clip or 0.0,
    }  # fmt: skip
    return spec.build(hyper, schedule)


def _scale_state(opt_state):
    """The ``InjectHyperparamsState`` of the final lr ``scale`` (found by its hyperparameter's
    name, not by its place in the chain)."""
    found = optax.tree_utils.tree_get(opt_state, "step_size")
    if found is None:
        raise ValueError("this optimizer state has no lr scale (not built by OptimizerSpec.build)")
    return found


def lr_scale(opt_state) -> float:
    """The reduce-on-plateau factor an :class:`OptimizerSpec` state carries (1.0 at first)."""
    return float(_scale_state(opt_state))


def set_lr_scale(opt_state, value: float):
    """``opt_state`` with the lr scale set to ``value`` (same dtype, structure and devices)."""
    old = _scale_state(opt_state)
    return optax.tree_utils.tree_set(opt_state, step_size=jnp.asarray(value, old.dtype))


def trainable_layers(model, trainable: str) -> tuple[str, ...]:
    """Names of the layers a phase trains: ``model.trainable_layers(trainable)`` (``"head"``,
    ``"all"`` or ``"top:N"``: the model's last N stages plus the head)."""
    return model.trainable_layers(trainable)
