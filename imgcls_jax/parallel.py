"""Data parallelism over every device of every host, with ``jax.sharding`` and ``jax.distributed``.

One 1-D :class:`~jax.sharding.Mesh` with a ``"data"`` axis spans all (global) devices. Batches
are split on their leading axis over it; the trainable state is replicated, or with
``fsdp_min_size`` its large leaves are split over the same axis (FSDP-style: XLA gathers them for
the step). Frozen parameters are replicated. Steps are ``jax.jit`` with explicit in/out shardings,
donating the state, so one compiled program runs SPMD on all devices and the gradient mean over the
global batch becomes an all-reduce.

Results do not depend on the device count: the global batch (``per-device batch x devices``) is
the same array whatever its sharding, and dropout keys are ``fold_in(key, step)`` over the global
batch shape (JAX's partitionable threefry makes the bits independent of the sharding). Only the
order of float32 sums changes.

Multi-host: call :func:`initialize_distributed` first (before any other JAX call); each process
reads its own share of the files (:func:`shard_records`) and feeds its local batch, which
:func:`to_global` joins into one global array. Every process must run the same number of steps.

No TensorFlow here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

ENV_COORDINATOR = "IMGCLS_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "IMGCLS_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "IMGCLS_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "IMGCLS_JAX_LOCAL_DEVICE_IDS"


# ---------------------------------------------------------------------------------------- meshes
def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: ``jax.devices()``, all hosts').

    Devices are ordered by (process, id), so process ``p``'s devices hold one contiguous block of
    the batch axis: the ``p``-th block of the global batch is process ``p``'s local batch.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    if not devices:
        raise ValueError("make_mesh: no devices given")
    return Mesh(np.asarray(devices), (axis,))


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


# ----------------------------------------------------------------------------------------- steps
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
    """Wrap the steps of :mod:`imgcls_jax.train.steps` into SPMD steps over ``mesh``.

    Args:
      train_step: ``make_train_step(...)`` (``(state, frozen, batch) -> (state, metrics)``).
      eval_step: ``make_eval_step(split)`` (``(params, frozen, batch) -> outputs``).
      state: a ``TrainState`` (only its structure, shapes and dtypes are used).
      frozen: the frozen parameters (replicated).
      fsdp_min_size: shard state leaves of at least this many elements (None: replicate all).

    Batches passed to the steps must be global arrays on ``batch_sharding`` (see
    :func:`to_global`); their size must divide by the device count.
    """
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
    outputs = {"logits": data, "loss_sum": rep, "correct": rep, "count": rep}
    evaluate = jax.jit(
        lambda p, f, b: eval_step(p, f, b),
        in_shardings=(params_sharding, frozen_sharding, data),
        out_shardings=outputs,
    )
    return ParallelSteps(mesh, train, evaluate, state_sharding, params_sharding, frozen_sharding, data)


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
                f"batch[{name!r}] has shape {x.shape}: its leading size must divide over this "
                f"process's {local} devices; pad it (pad_batch) or change the batch size"
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


def evaluate(
    steps: ParallelSteps,
    params: Any,
    frozen: Any,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    num_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy over every real image of every process's ``batches``.

    ``batches``: this process's host batches ``{"image", "label": int[B], "mask": bool[B]}`` (no
    mask: all real), each padded here to a multiple of the local device count; ``B`` must be the
    same on every process. The processes' shares may differ in size: all of them step
    ``num_batches`` times (default: the largest ``len(batches)`` of any process), and a process
    that runs out feeds fully masked batches. Returns ``loss`` (mean, nats), ``accuracy`` and
    ``count`` (images counted over all processes), the same on every process.
    """
    local = len(steps.mesh.local_devices)
    if num_batches is None and jax.process_count() > 1:
        if not hasattr(batches, "__len__"):
            raise ValueError("evaluate: with several processes pass num_batches or batches with a len()")
        num_batches = max_over_processes(len(batches))  # type: ignore[arg-type]
    totals = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for seen, batch in enumerate(masked_tail(batches, num_batches), start=1):
        if num_batches is not None and seen > num_batches:
            raise ValueError(f"evaluate: more batches than num_batches={num_batches}")
        out = steps.evaluate(params, frozen, to_global(pad_batch(batch, local), steps.mesh))
        for key, value in jax.device_get({k: out[k] for k in totals}).items():
            totals[key] += value.item()
    count = totals["count"]
    return {
        "loss": totals["loss_sum"] / max(count, 1),
        "accuracy": totals["correct"] / max(count, 1),
        "count": count,
    }


# ------------------------------------------------------------------------------------ multi-host
def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    auto_detect: bool = True,
) -> bool:
    """Join a multi-process JAX run; call once, before any other JAX call. Returns whether a
    distributed runtime is now up (False: a single-process run, nothing was done).

    Unset arguments come from ``IMGCLS_JAX_COORDINATOR`` (``host:port`` of process 0),
    ``IMGCLS_JAX_NUM_PROCESSES``, ``IMGCLS_JAX_PROCESS_ID`` and ``IMGCLS_JAX_LOCAL_DEVICE_IDS``
    (comma-separated). With none of them set and ``auto_detect``, JAX's own cluster detection
    (SLURM, Open MPI, Kubernetes, Cloud TPU, ``JAX_COORDINATOR_ADDRESS``) decides; if it finds no
    cluster, the run is single-process. ``num_processes=1`` is single-process too.
    """
    if jax.distributed.is_initialized():
        log.info(
            "jax.distributed already initialized (process %d of %d)", jax.process_index(), jax.process_count()
        )
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
        raw = os.environ[ENV_LOCAL_DEVICE_IDS]
        try:
            local_device_ids = [int(i) for i in raw.split(",")]
        except ValueError:
            raise ValueError(
                f"{ENV_LOCAL_DEVICE_IDS}={raw!r} is not a comma-separated list of integers"
            ) from None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
    if num_processes == 1:
        log.info("num_processes=1: single-process run, jax.distributed not started")
        return False
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        if not auto_detect:
            return False
        try:
            jax.distributed.initialize(local_device_ids=local_device_ids)
        except RuntimeError as err:  # JAX already computed something in this process
            if "must be called before" not in str(err):
                raise
            log.warning(
                "JAX is already running in this process, so cluster auto-detection was skipped: "
                "single-process run (call initialize_distributed() before any JAX computation)"
            )
            return False
        except ValueError as err:  # raised before anything starts when no cluster is detected
            if "coordinator_address should be defined" not in str(err):
                raise ValueError(f"jax.distributed auto-detection failed: {err}") from err
            log.info("no cluster detected: single-process run")
            return False
    else:
        try:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
        except ValueError as err:
            raise ValueError(
                f"cannot start jax.distributed with coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes}, process_id={process_id}: {err}. Set all three (arguments "
                f"or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) or run under a cluster "
                "manager JAX detects"
            ) from err
    log.info(
        "jax.distributed up: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def shard_records(
    records: Sequence[Any],
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    seed: int = 0,
    equal_sizes: bool = False,
) -> list:
    """This process's disjoint share of ``records`` (objects with ``path`` and ``label``).

    Records are sorted by path, shuffled within each class with ``seed`` and laid out class after
    class; process ``i`` takes every ``process_count``-th from position ``i``. So the shares are a
    partition of ``records``, each class is split as evenly as possible (stratified), and the result
    is the same on every machine. ``equal_sizes`` drops the few (< ``process_count``) records that
    make shares unequal: training needs every process to run the same number of steps.
    Defaults: ``jax.process_index()`` and ``jax.process_count()``.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard_records: need 0 <= process_index < process_count, got {index} of {count}")
    by_class: dict[Any, list] = {}
    for r in sorted(records, key=lambda r: r.path):
        by_class.setdefault(r.label, []).append(r)
    ordered = []
    for label, members in sorted(by_class.items()):
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        ordered += [members[i] for i in order]
    if len(ordered) < count:
        raise ValueError(f"shard_records: {len(ordered)} records cannot give each of {count} processes one")
    share = ordered[index::count]
    if equal_sizes:
        dropped = len(ordered) % count
        share = share[: len(ordered) // count]
        if dropped and index == 0:
            log.info("shard_records: %d records left out so that all %d shares are equal", dropped, count)
    return share
