"""The device mesh and joining a multi-process run (``jax.distributed``).

One 1-D :class:`~jax.sharding.Mesh` with a ``"data"`` axis spans all (global) devices, ordered by
(process, id), so process ``p``'s devices hold one contiguous block of the batch axis. Results do
not depend on the device count: the global batch is the same array whatever its sharding, and
dropout keys are ``fold_in(key, step)`` over the global batch shape (JAX's partitionable threefry
makes the bits independent of the sharding); only the order of float32 sums changes.

Multi-host: call :func:`initialize_distributed` first (before any other JAX call); each process
reads its own share of the files (:func:`imgcls_jax.data.shard_records`) and feeds its local
batch. Every process must run the same number of steps. No TensorFlow here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger(__name__)

ENV_COORDINATOR = "IMGCLS_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "IMGCLS_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "IMGCLS_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "IMGCLS_JAX_LOCAL_DEVICE_IDS"


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: ``jax.devices()``, all hosts').

    Devices are ordered by (process, id), so process ``p``'s devices hold one contiguous block of
    the batch axis: the ``p``-th block of the global batch is process ``p``'s local batch.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    if not devices:
        raise ValueError("make_mesh: no devices given")
    return Mesh(np.asarray(devices), (axis,))


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
