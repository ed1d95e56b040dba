"""Put host batches on the devices ahead of time, split over the data axis of the mesh of
:func:`imgcls_jax.parallel.make_mesh` (the same mesh and device order as training). No TensorFlow."""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding

from imgcls_jax.parallel import batch_sharding, make_mesh, prefetch_to_device, to_global

__all__ = ["data_sharding", "prefetch_to_device", "to_device"]


def data_sharding(mesh: Mesh | None = None) -> NamedSharding:
    """The leading (batch) axis split over ``mesh``'s data axis (default: every device)."""
    return batch_sharding(mesh or make_mesh())


def to_device(batch, sharding: NamedSharding):
    """This process's numpy batch as global arrays on ``sharding`` (see
    :func:`imgcls_jax.parallel.to_global`)."""
    return to_global(batch, sharding.mesh)
