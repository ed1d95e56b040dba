"""Keras's epoch-end decisions as pure functions of the monitored scores.

``keras.callbacks.ReduceLROnPlateau``, ``EarlyStopping`` and ``ModelCheckpoint(save_best_only=True)``
each keep a little state (the best value so far, a wait counter, a cooldown counter) that depends
on nothing but the sequence of monitored values. Here that state is recomputed from the sequence
each time, so :class:`~imgcls_jax.train.loop.Trainer` decides from its history (``metrics.csv``,
which a resumed run reads back exactly) and a resumed run decides as an uninterrupted one.

The rules are Keras 3's, comparisons included (tests/test_from_keras.py feeds the real callbacks
the same sequences): a value is an improvement when it beats the best so far by more than
``min_delta`` (strictly; a tie is not one), compared as Keras does, in float32 (Keras turns the
Python floats of its logs into float32 tensors): ``float32(current - min_delta) > float32(best)``
when maximising, ``float32(current + min_delta) < float32(best)`` when minimising. The first value
is always an improvement, NaN never is after it. ``None`` in a sequence is an epoch without the
monitored value (no validation that epoch): Keras skips such an epoch, and so do these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Scores = Sequence[float | None]
_TINY = np.finfo(np.float32).tiny


def _f32(value: float) -> np.float32:
    """``value`` in float32 as Keras's comparison sees it on the CPU: TensorFlow's kernels flush
    subnormal numbers to zero (found by tests/test_from_keras.py: a score of 1.4e-45 is no
    improvement on 0 for Keras)."""
    v = np.float32(value)
    return np.float32(0.0) if abs(v) < _TINY else v


def is_improvement(current: float, best: float | None, *, mode_max: bool, min_delta: float = 0.0) -> bool:
    """Whether ``current`` improves on ``best`` (None: nothing yet, so it does), as Keras's
    ``MonitorCallback._is_improvement``; ``min_delta`` is taken as its absolute value."""
    if best is None:
        return True
    delta = abs(min_delta)
    if mode_max:
        return bool(_f32(current - delta) > _f32(best))
    return bool(_f32(current + delta) < _f32(best))


def improvements(scores: Scores, *, mode_max: bool, min_delta: float = 0.0) -> list[bool]:
    """For each epoch, whether its score improved on the best before it: the epochs that
    ``ModelCheckpoint(save_best_only=True)`` saves (``min_delta`` 0) and that
    ``EarlyStopping(restore_best_weights=True)`` remembers."""
    best, out = None, []
    for current in scores:
        better = current is not None and is_improvement(current, best, mode_max=mode_max, min_delta=min_delta)
        if better:
            best = current
        out.append(better)
    return out


def best_epoch(scores: Scores, *, mode_max: bool, min_delta: float = 0.0) -> int | None:
    """Index of the epoch Keras keeps as the best (the last improvement; of equal scores the
    first): ``ModelCheckpoint(save_best_only=True)``'s last file, ``EarlyStopping``'s
    ``best_epoch``. None when no epoch has a score."""
    marks = improvements(scores, mode_max=mode_max, min_delta=min_delta)
    return max((i for i, better in enumerate(marks) if better), default=None)


def plateau_learning_rates(
    scores: Scores,
    learning_rate: float,
    *,
    mode_max: bool,
    factor: float,
    patience: int,
    min_delta: float = 1e-4,
    cooldown: int = 0,
    min_lr: float = 0.0,
) -> list[float]:
    """The learning rate after each epoch under ``ReduceLROnPlateau``, starting at
    ``learning_rate`` (Keras's defaults for ``min_delta``, ``cooldown``, ``min_lr``).

    After ``patience`` epochs without improvement the rate becomes ``max(lr * factor, min_lr)``
    (if it is above ``min_lr``; rounded to float32 as Keras's optimizer variable holds it), the
    wait starts again, and ``cooldown`` epochs follow during which no wait is counted. The best
    score is kept across reductions.

    Returns:
      ``len(scores)`` floats: element ``i`` is the rate the epoch after ``i`` trains with.
    """
    lr = float(np.float32(learning_rate))
    best, wait, cooling, out = None, 0, 0, []
    for current in scores:
        if current is not None:
            if cooling > 0:
                cooling -= 1
                wait = 0
            if is_improvement(current, best, mode_max=mode_max, min_delta=min_delta):
                best, wait = current, 0
            elif cooling == 0:
                wait += 1
                if wait >= patience and lr > np.float32(min_lr):
                    lr = float(np.float32(max(lr * factor, min_lr)))
                    cooling, wait = cooldown, 0
        out.append(lr)
    return out


def early_stopping_epoch(
    scores: Scores,
    *,
    mode_max: bool,
    patience: int,
    min_delta: float = 0.0,
    baseline: float | None = None,
    start_from_epoch: int = 0,
) -> int | None:
    """Index of the epoch after which ``EarlyStopping`` stops training, or None if it does not
    within ``scores``.

    Each scored epoch from ``start_from_epoch`` on counts one more epoch of waiting; an
    improvement (that also beats ``baseline``, when given) starts the wait again; training stops
    once the wait reaches ``patience`` (not after the very first epoch).
    """
    best, wait = None, 0
    for epoch, current in enumerate(scores):
        if current is None or epoch < start_from_epoch:
            continue
        wait += 1
        if is_improvement(current, best, mode_max=mode_max, min_delta=min_delta):
            best = current
            if baseline is None or is_improvement(current, baseline, mode_max=mode_max, min_delta=min_delta):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch
    return None
