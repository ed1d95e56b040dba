"""Deprecated names of ``imgcls_jax.train.steps`` and ``imgcls_jax.train.loop`` (0.1), kept for
one release. ``fit`` now runs :func:`~imgcls_jax.train.steps.make_train_step` and
:func:`~imgcls_jax.train.steps.make_eval_step` themselves (one implementation, compiled once per
structure), and validates through :func:`~imgcls_jax.train.evaluation.evaluate_batches`."""

from __future__ import annotations

import warnings

from imgcls_jax.config import PhaseConfig
from imgcls_jax.train.evaluation import evaluate_batches
from imgcls_jax.train.optim import OptimizerSpec
from imgcls_jax.train.steps import image_forward, make_eval_step, make_train_step

#: Where each deprecated name lived.
MOVED = {
    "cached_train_step": "imgcls_jax.train.steps",
    "cached_eval_step": "imgcls_jax.train.steps",
    "evaluate_pipeline": "imgcls_jax.train.loop",
    "phase_optimizer": "imgcls_jax.train.loop",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{MOVED[old]}.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def cached_train_step(split, spec, hyper: dict, *, dropout_key, forward=image_forward):
    """Deprecated: ``make_train_step(split, spec, hyper=..., label_smoothing=..., ema_decay=...)``."""
    _warn("cached_train_step", "imgcls_jax.train.make_train_step(split, spec, hyper=...)")
    numbers = {k: v for k, v in hyper.items() if k not in ("label_smoothing", "ema_decay")}
    return make_train_step(
        split, spec, hyper=numbers, label_smoothing=hyper.get("label_smoothing", 0.0),
        ema_decay=hyper.get("ema_decay") or None, dropout_key=dropout_key, forward=forward,
    )  # fmt: skip


def cached_eval_step(split, forward=image_forward):
    """Deprecated: :func:`~imgcls_jax.train.steps.make_eval_step` (it is cached the same way)."""
    _warn("cached_eval_step", "imgcls_jax.train.make_eval_step")
    return make_eval_step(split, forward)


def evaluate_pipeline(split, params, frozen, pipeline, forward=image_forward) -> dict[str, float]:
    """Deprecated: :func:`~imgcls_jax.train.evaluation.evaluate_batches` with an eval step."""
    _warn("evaluate_pipeline", "imgcls_jax.train.evaluate_batches")
    step = make_eval_step(split, forward)
    totals = evaluate_batches(lambda b: step(params, frozen, b), pipeline.epoch(0))
    return {"loss": totals.loss, "accuracy": totals.accuracy, "count": totals.count}


def phase_optimizer(
    phase: PhaseConfig, steps_per_epoch: int, head_layers, grad_clip=None, label_smoothing=0.0, ema_decay=None
):
    """Deprecated: :meth:`~imgcls_jax.train.optim.OptimizerSpec.for_phase`."""
    _warn("phase_optimizer", "imgcls_jax.train.OptimizerSpec.for_phase")
    spec, hyper = OptimizerSpec.for_phase(phase, steps_per_epoch, head_layers, grad_clip)
    unit = spec.unit_schedule()
    hyper = {**hyper, "label_smoothing": label_smoothing, "ema_decay": ema_decay or 0.0}
    return spec, hyper, lambda step: phase.learning_rate * unit(step)
