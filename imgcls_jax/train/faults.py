"""A test-only hook: kill this process at a chosen moment of a run, to test that runs resume.

Set ``IMGCLS_JAX_TEST_KILL_AT`` to ``"STAGE:N"`` or ``"STAGE@EPOCH:N"`` and the process sends
itself ``SIGKILL`` (no cleanup, no ``finally``, no flushing: what a power cut or the OOM killer
does) the ``N``-th time (counted from 1, in this process) it reaches ``STAGE`` (of epoch
``EPOCH`` when given). Unset (always, outside tests) :func:`kill_point` returns at once.

Stages (where :func:`kill_point` is called):

``features``
    after each batch of the frozen base's outputs is computed (the feature cache build,
    :func:`imgcls_jax.train.features.compute_features`).
``train_step``
    after each train step is dispatched (mid-epoch; with ``steps_per_execution`` k, after each
    group of k steps), with the epoch.
``validate``
    before each validation batch of an epoch, with the epoch.
``eval_batch``
    before each batch of :func:`imgcls_jax.train.evaluate_batches` (validation and the final
    evaluation, ``evaluate_run``, alike).
``save``
    right after the epoch's checkpoint save has been started (orbax writes it in a background
    thread: the kill lands while it is being written), with the epoch.
``save_best``
    right after the epoch's ``best/`` save has been started, with the epoch.
``metrics``
    right after the epoch's ``metrics.csv`` row is written, before its checkpoint, with the epoch.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

log = logging.getLogger(__name__)

#: The environment variable read by :func:`kill_point` (tests only).
KILL_ENV = "IMGCLS_JAX_TEST_KILL_AT"

_reached: Counter = Counter()


def parse_kill_spec(spec: str) -> tuple[str, int | None, int]:
    """``"STAGE@EPOCH:N"`` or ``"STAGE:N"`` -> ``(stage, epoch or None, n)``; a ``ValueError``
    naming :data:`KILL_ENV` and the value for anything else."""
    where, _, count = spec.rpartition(":")
    stage, at, epoch = where.partition("@")
    try:
        n, e = int(count), (int(epoch) if at else None)
    except ValueError:
        n = e = None
    if not stage or n is None or n < 1 or (at and e is None):
        raise ValueError(f"{KILL_ENV}={spec!r}: expected 'STAGE:N' or 'STAGE@EPOCH:N' with N >= 1")
    return stage, e, n


def kill_point(stage: str, epoch: int | None = None) -> None:
    """SIGKILL this process if :data:`KILL_ENV` names this moment (see the module docstring)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, at, n = parse_kill_spec(spec)
    if stage != want or (at is not None and at != epoch):
        return
    _reached[spec] += 1
    if _reached[spec] == n:
        log.warning("%s=%s: killing process %d now", KILL_ENV, spec, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
