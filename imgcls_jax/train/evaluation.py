"""The one evaluation loop: every image of a split counted exactly once, on any number of devices
and processes. ``fit``'s validation and :func:`imgcls_jax.evaluate.evaluate_run` both run
:func:`evaluate_batches`.

Each host batch is padded to a multiple of this process's device count (the padding masked), put
on the devices split over the data axis, and evaluated; the sums (loss, top-1, top-5, count,
confusion matrix) accumulate on the devices and come back once at the end. With several
processes, every process steps the same number of times (a process whose share is shorter feeds
fully masked batches), so the collective programs line up, and all get the same totals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax
import numpy as np

from imgcls_jax.train.faults import kill_point

SUMS = ("loss_sum", "correct", "top5", "count", "confusion")


@dataclass
class EvalTotals:
    """Sums over every real image of a split: ``loss`` (mean, nats), ``accuracy`` (top-1),
    ``top5``, ``count`` and ``confusion`` (int64[K, K], rows true class, columns predicted)."""

    loss: float
    accuracy: float
    top5: float
    count: int
    confusion: np.ndarray


def evaluate_batches(
    eval_fn: Callable[[dict], dict],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    mesh=None,
    num_batches: int | None = None,
    expected: int | None = None,
) -> EvalTotals:
    """Evaluate ``batches`` (this process's host batches, each with ``mask: bool[B]`` marking
    its real rows; no mask: all real) with ``eval_fn`` (a device batch -> the sums of
    :func:`~imgcls_jax.train.steps.eval_outputs`, e.g. ``lambda b: eval_step(params, frozen,
    b)``).

    ``mesh``: the data mesh to split batches over (default: every device, see
    :func:`imgcls_jax.parallel.make_mesh`). ``num_batches``: how many steps every process takes
    (default: with several processes, the largest ``len(batches)`` of any of them; then
    ``batches`` needs a ``len``). ``expected``: the number of real images over all processes; a
    different count is an error (an image lost or counted twice).
    """
    from imgcls_jax import parallel

    mesh = mesh or parallel.make_mesh()
    local = len(mesh.local_devices)
    if num_batches is None and jax.process_count() > 1:
        if not hasattr(batches, "__len__"):
            raise ValueError(
                "evaluate_batches: with several processes pass num_batches or batches with a len()"
            )
        num_batches = parallel.max_over_processes(len(batches))  # type: ignore[arg-type]
    padded = (parallel.pad_batch(b, local) for b in parallel.masked_tail(batches, num_batches))
    totals = None
    for seen, batch in enumerate(parallel.prefetch_to_device(padded, mesh=mesh), start=1):
        if num_batches is not None and seen > num_batches:
            raise ValueError(f"evaluate_batches: more batches than num_batches={num_batches}")
        kill_point("eval_batch")
        out = eval_fn(batch)
        sums = {k: out[k] for k in SUMS}
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
        raise ValueError("evaluate_batches: no batches to evaluate")
    host = {k: np.asarray(v) for k, v in jax.device_get(parallel.to_host(totals)).items()}
    count = int(host["count"])
    if expected is not None and count != expected:
        raise RuntimeError(f"evaluated {count} images, expected {expected}")
    confusion = host["confusion"].astype(np.int64)
    if int(confusion.sum()) != count:  # a label outside 0..K-1 is not counted by the jitted update
        raise RuntimeError(
            f"confusion matrix holds {int(confusion.sum())} of {count} images: labels out of range"
        )
    n = max(count, 1)
    return EvalTotals(
        loss=float(host["loss_sum"]) / n,
        accuracy=int(host["correct"]) / n,
        top5=int(host["top5"]) / n,
        count=count,
        confusion=confusion,
    )
