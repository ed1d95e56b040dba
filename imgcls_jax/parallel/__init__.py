"""Data parallelism over every device of every host: the mesh, joining a multi-process run, and
where arrays live (shardings, placing trees and batches). No TensorFlow here.

Each process's share of the images is :func:`imgcls_jax.data.shard_records`; the one evaluation
loop is :func:`imgcls_jax.train.evaluate_batches`.
"""

from imgcls_jax.parallel.mesh import (
    ENV_COORDINATOR,
    ENV_LOCAL_DEVICE_IDS,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    initialize_distributed,
    make_mesh,
)
from imgcls_jax.parallel.placement import (
    batch_sharding,
    fsdp_spec,
    global_batch_size,
    local_batch_size,
    masked_tail,
    max_over_processes,
    pad_batch,
    place,
    prefetch_to_device,
    process_batch_size,
    replicated,
    restore_target,
    to_global,
    to_host,
    tree_shardings,
)

__all__ = [
    "ENV_COORDINATOR",
    "ENV_LOCAL_DEVICE_IDS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "batch_sharding",
    "fsdp_spec",
    "global_batch_size",
    "initialize_distributed",
    "local_batch_size",
    "make_mesh",
    "masked_tail",
    "max_over_processes",
    "pad_batch",
    "place",
    "prefetch_to_device",
    "process_batch_size",
    "replicated",
    "restore_target",
    "to_global",
    "to_host",
    "tree_shardings",
]
