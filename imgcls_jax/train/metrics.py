"""Device-side classification counts, jittable: a confusion-matrix accumulator and top-k counts.

Conventions: ``K`` classes, labels and predictions are class indices in ``[0, K)``; a confusion
matrix ``cm: int[K, K]`` has rows = true class and columns = predicted class. Padded batch
entries are masked out. The host-side report maths is in :mod:`imgcls_jax.evaluate.metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its values are known now (not traced under jit), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_batch(name: str, labels, predictions_or_logits, mask, logits: bool) -> None:
    """Static shape/dtype checks (these run at trace time too)."""
    other = "logits" if logits else "predictions"
    if labels.ndim != 1:
        raise ValueError(f"{name}: labels must be int[B], got shape {labels.shape}")
    expected = labels.shape + ((predictions_or_logits.shape[-1],) if logits else ())
    if predictions_or_logits.shape != expected or mask.shape != labels.shape:
        raise ValueError(
            f"{name}: shapes disagree: labels {labels.shape}, {other} {predictions_or_logits.shape}, "
            f"mask {mask.shape} (expected labels [B], {other} {list(expected)}, mask [B])"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if not logits and not jnp.issubdtype(predictions_or_logits.dtype, jnp.integer):
        raise ValueError(f"{name}: predictions must be integers, got dtype {predictions_or_logits.dtype}")


def _check_range(name: str, what: str, values, mask, k: int) -> None:
    """Raise on out-of-range class indices among unmasked entries, when values are concrete."""
    v, m = _concrete(values), _concrete(mask)
    if v is None or m is None:
        return
    bad = np.flatnonzero(m.astype(bool) & ((v < 0) | (v >= k)))
    if bad.size:
        raise ValueError(
            f"{name}: {what}[{bad[0]}] = {v[bad[0]]} is outside [0, {k}) "
            f"({bad.size} unmasked entries out of range)"
        )


def confusion_matrix_update(
    cm: jax.Array, labels: jax.Array, predictions: jax.Array, mask: jax.Array
) -> jax.Array:
    """Add a batch to a confusion matrix; jittable.

    Args:
      cm: int32[K, K], rows = true class, columns = predicted class.
      labels: int[B] true classes; predictions: int[B] predicted classes.
      mask: bool[B]; entries where it is False (batch padding) are not counted.

    Returns:
      int32[K, K]: ``cm`` plus the batch's counts.

    Raises:
      ValueError: bad shapes or dtypes (also at trace time), or, when called with concrete
        values (not under jit), an unmasked label or prediction outside ``[0, K)``. Under jit
        such entries cannot raise: they are not counted, so ``cm.sum()`` falls short of
        ``mask.sum()`` -- compare the two to detect them.
    """
    cm, labels, predictions, mask = map(jnp.asarray, (cm, labels, predictions, mask))
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_matrix_update: cm must be square [K, K], got shape {cm.shape}")
    _check_batch("confusion_matrix_update", labels, predictions, mask, logits=False)
    k = cm.shape[0]
    _check_range("confusion_matrix_update", "labels", labels, mask, k)
    _check_range("confusion_matrix_update", "predictions", predictions, mask, k)
    valid = mask.astype(bool) & (labels >= 0) & (labels < k) & (predictions >= 0) & (predictions < k)
    flat = jnp.where(valid, labels * k + predictions, 0).astype(jnp.int32)
    counts = jnp.zeros((k * k,), jnp.int32).at[flat].add(valid.astype(jnp.int32))
    return cm.astype(jnp.int32) + counts.reshape(k, k)


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """How many unmasked examples have their true class among the ``k`` best logits; jittable.

    Ties: classes are ranked by logit, equal logits by class index (lower index first), the
    order of ``jnp.argmax`` and ``jax.lax.top_k``. So ``k=1`` counts ``argmax == label``, and
    the top-1 count equals the trace of the confusion matrix built from ``argmax``. Logits must
    be finite (NaN gives an unspecified rank).

    Args:
      logits: float[B, K]; labels: int[B]; mask: bool[B] (False entries are not counted).
      k: static int >= 1; a ``k`` larger than ``K`` counts as ``K`` (every valid example).

    Returns:
      int32 scalar. Under jit, labels outside ``[0, K)`` are counted as wrong; called eagerly
      they raise ValueError.
    """
    logits, labels, mask = map(jnp.asarray, (logits, labels, mask))
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"topk_correct: k must be an int >= 1, got {k!r}")
    if logits.ndim != 2:
        raise ValueError(f"topk_correct: logits must be float[B, K], got shape {logits.shape}")
    _check_batch("topk_correct", labels, logits, mask, logits=True)
    num_classes = logits.shape[1]
    _check_range("topk_correct", "labels", labels, mask, num_classes)
    k = min(int(k), num_classes)
    valid = mask.astype(bool) & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    own = jnp.take_along_axis(logits, safe[:, None], axis=1)
    before = (logits > own) | ((logits == own) & (jnp.arange(num_classes)[None, :] < safe[:, None]))
    rank = before.sum(axis=1)
    return jnp.sum(valid & (rank < k), dtype=jnp.int32)
