"""Where arrays live: shardings over a 1-D ``"data"`` mesh, placing trees and batches on it.

Batches are split on their leading axis over the mesh; the trainable state is replicated, or with
``fsdp_min_size`` its large leaves are split over the same axis (FSDP-style: XLA gathers them for
the step). Frozen parameters are replicated. Each process passes its own rows of a global batch
(:func:`to_global`); process ``p``'s rows are the ``p``-th block (see
:func:`imgcls_jax.parallel.make_mesh`'s device order). No TensorFlow here.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


# ------------------------------------------------------------------------------------- shardings
def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D data mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], num_shards: int, axis: str, min_size: int) -> PartitionSpec:
    """Split the largest dimension divisible by ``num_shards`` over ``axis``, for leaves of at
    least ``min_size`` elements; smaller or indivisible leaves stay replicated (``P()``)."""
    if num_shards <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % num_shards == 0]
    if not dims:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[dims[0]] = axis
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, *, fsdp_min_size: int | None = None) -> Any:
    """A sharding per leaf of ``tree``: replicated, or :func:`fsdp_spec` when ``fsdp_min_size``
    (elements) is given. The result has ``tree``'s structure (usable as jit in/out shardings)."""
    axis, n = _axis(mesh), mesh.devices.size

    def one(x):
        if fsdp_min_size is None:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(np.shape(x), n, axis, fsdp_min_size))

    return jax.tree.map(one, tree)


def _put(x, sharding: NamedSharding):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # the same value on every process: each keeps the shards it holds
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
    """Put ``tree`` (numpy or jax arrays, identical on every process) onto ``shardings``.

    ``shardings``: one sharding, or a tree of them matching ``tree``. Works across hosts.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put(x, shardings), tree)
    return jax.tree.map(_put, tree, shardings)


def restore_target(tree: Any, shardings: Any) -> Any:
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: pass it to orbax's
    ``StandardRestore`` to restore a checkpoint (saved on any device count) directly onto a mesh."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def to_host(tree: Any) -> Any:
    """Numpy copies of global arrays, gathered from every host when they are sharded across hosts."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# --------------------------------------------------------------------------------------- batches
def global_batch_size(per_device: int, mesh: Mesh) -> int:
    """Images per step over the whole mesh: ``per_device x devices``."""
    return per_device * mesh.devices.size


def local_batch_size(per_device: int, mesh: Mesh) -> int:
    """Images this process feeds per step: ``per_device x its devices in mesh``."""
    return per_device * len(mesh.local_devices)


def process_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a ``global_batch`` (images per step over the whole mesh): the
    batch size to give this process's input pipeline. ``global_batch`` must divide by the
    device count, so that every device gets the same number of images."""
    devices = mesh.devices.size
    if global_batch < 1 or global_batch % devices:
        raise ValueError(
            f"global batch size {global_batch} does not divide over {devices} devices; use a multiple "
            f"of {devices} (e.g. {max(1, round(global_batch / devices)) * devices})"
        )
    return global_batch // devices * len(mesh.local_devices)


def pad_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pad every array of ``batch`` with zeros on axis 0 to a multiple of ``multiple``.

    Adds ``mask: bool[B]`` (all True) when missing; padded rows get ``mask`` False, so
    masked sums count every real image exactly once.
    """
    if multiple < 1:
        raise ValueError(f"pad_batch: multiple must be >= 1, got {multiple}")
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"pad_batch: arrays disagree on the batch size: {sizes}")
    n = next(iter(sizes.values()))
    batch = {k: np.asarray(v) for k, v in batch.items()}
    batch.setdefault("mask", np.ones(n, bool))
    extra = -n % multiple
    if not extra:
        return batch
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch -> global arrays on ``batch_sharding(mesh)``.

    Process ``p``'s rows become the ``p``-th block of the global batch (global size = local size x
    processes). The local size must divide by this process's devices in ``mesh`` (see
    :func:`pad_batch`).
    """
    sharding, local = batch_sharding(mesh), len(mesh.local_devices)

    def one(name, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(
                f"batch[{name!r}] has shape {x.shape}: its leading size does not divide over this "
                f"process's {local} devices; pad it (pad_batch) or make the batch size a multiple of them"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return {name: one(name, x) for name, x in batch.items()}


def max_over_processes(value: int) -> int:
    """The largest ``value`` any process passes (every process must call this)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def masked_tail(
    batches: Iterable[dict[str, np.ndarray]], total: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """``batches``, then fully masked (all-zero) copies of the last one up to ``total`` batches in
    all, so a process with a smaller share of an evaluation split keeps stepping with the others.
    ``total=None``: ``batches`` unchanged. Raises ``ValueError`` if padding is needed and there
    was no batch to copy the shapes from."""
    seen, last = 0, None
    for last in batches:
        seen += 1
        yield last
    if total is not None and seen < total:
        if last is None:
            raise ValueError("evaluation: this process has no batch to take the batch shape from")
        for _ in range(total - seen):
            yield {k: np.zeros_like(v) for k, v in last.items()}


def prefetch_to_device(
    batches: Iterable, size: int = 2, *, mesh: Mesh | None = None, sharding: NamedSharding | None = None
) -> Iterator:
    """Yield this process's host ``batches`` as global device arrays split over the data axis,
    keeping ``size`` batches in flight (transfers are asynchronous, so the next batch is copied
    while the current step runs).

    ``mesh``: default :func:`~imgcls_jax.parallel.make_mesh` (every device of every process);
    ``sharding``: a batch sharding to use instead. Each batch's leading size must divide over this
    process's devices of the mesh (see :func:`pad_batch`).
    """
    if sharding is None:
        from imgcls_jax.parallel.mesh import make_mesh

        sharding = batch_sharding(mesh or make_mesh())
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(to_global(batch, sharding.mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
