"""Deprecated names of ``imgcls_jax.parallel`` (0.1), kept for one release.

``make_parallel_steps`` wrapped already-built steps in another ``jax.jit`` with shardings; ``fit``
now places the state itself and its steps keep the layout (``make_train_step(...,
placement=(mesh, fsdp_min_size))``). ``evaluate`` is :func:`imgcls_jax.train.evaluate_batches`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from imgcls_jax.parallel.placement import batch_sharding, place, replicated, tree_shardings


def _warn(old: str, new: str) -> None:
    warnings.warn(f"imgcls_jax.parallel.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


@dataclass
class ParallelSteps:
    """Sharded steps over ``mesh`` (see :func:`make_parallel_steps`).

    ``train(state, frozen, batch) -> (state, metrics)`` donates ``state``; ``evaluate(params,
    frozen, batch) -> outputs`` (``logits`` stay batch-sharded, the sums are replicated).
    """

    mesh: Mesh
    train: Callable
    evaluate: Callable
    state_sharding: Any
    params_sharding: Any
    frozen_sharding: Any
    batch_sharding: NamedSharding

    def place_state(self, state: Any) -> Any:
        """Put a ``TrainState`` (e.g. from ``init_state``) on the mesh."""
        return place(state, self.state_sharding)

    def place_frozen(self, frozen: Any) -> Any:
        """Put the frozen parameters on the mesh (replicated)."""
        return place(frozen, self.frozen_sharding)


def make_parallel_steps(
    train_step: Callable,
    eval_step: Callable,
    state: Any,
    frozen: Any,
    mesh: Mesh,
    *,
    fsdp_min_size: int | None = None,
) -> ParallelSteps:
    """Deprecated: wrap built steps into SPMD steps over ``mesh``; ``fit``'s own path is
    ``make_train_step(..., placement=(mesh, fsdp_min_size))`` on a state placed with
    :func:`~imgcls_jax.parallel.place` and :func:`~imgcls_jax.parallel.tree_shardings`.

    Args:
      train_step: ``make_train_step(...)`` (``(state, frozen, batch) -> (state, metrics)``).
      eval_step: ``make_eval_step(split)`` (``(params, frozen, batch) -> outputs``).
      state: a ``TrainState`` (only its structure, shapes and dtypes are used).
      frozen: the frozen parameters (replicated).
      fsdp_min_size: shard state leaves of at least this many elements (None: replicate all).

    Batches passed to the steps must be global arrays on ``batch_sharding`` (see
    :func:`to_global`); their size must divide by the device count.
    """
    _warn("make_parallel_steps", "make_train_step(..., placement=(mesh, fsdp_min_size))")
    state_sharding = tree_shardings(state, mesh, fsdp_min_size=fsdp_min_size)
    params_sharding = state_sharding.params
    frozen_sharding = tree_shardings(frozen, mesh)
    data, rep = batch_sharding(mesh), replicated(mesh)
    train = jax.jit(
        lambda s, f, b: train_step(s, f, b),
        in_shardings=(state_sharding, frozen_sharding, data),
        out_shardings=(state_sharding, rep),
        donate_argnums=0,
    )
    outputs = {"logits": data, **{k: rep for k in ("loss_sum", "correct", "top5", "count", "confusion")}}
    evaluate = jax.jit(
        lambda p, f, b: eval_step(p, f, b),
        in_shardings=(params_sharding, frozen_sharding, data),
        out_shardings=outputs,
    )
    return ParallelSteps(mesh, train, evaluate, state_sharding, params_sharding, frozen_sharding, data)


def evaluate(
    steps: ParallelSteps,
    params: Any,
    frozen: Any,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    num_batches: int | None = None,
) -> dict[str, float]:
    """Deprecated: :func:`imgcls_jax.train.evaluate_batches` with ``steps.evaluate``."""
    from imgcls_jax.train.evaluation import evaluate_batches

    _warn("evaluate", "imgcls_jax.train.evaluate_batches")
    totals = evaluate_batches(
        lambda batch: steps.evaluate(params, frozen, batch), batches, mesh=steps.mesh, num_batches=num_batches
    )
    return {"loss": totals.loss, "accuracy": totals.accuracy, "count": totals.count}
