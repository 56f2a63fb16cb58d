"""Data parallelism by sharding: a 1-D ``data`` mesh over all devices, batch split, state replicated.

One ``jax.jit`` train step serves any number of devices: the batch's leading axis is
sharded over the mesh, parameters are replicated, and XLA inserts the gradient (and
BatchNorm statistics) all-reduce. On one device every function here is a no-op placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: devices is empty")
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, *, name: str = "batch_size") -> None:
    """Raise ValueError unless ``batch_size`` is a positive multiple of the mesh's device count
    (every device of every process); the message names sizes that work."""
    n = mesh.devices.size
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % n:
        where = f"{n} = {jax.process_count()} processes x {n // jax.process_count()}" \
            if jax.process_count() > 1 else f"{n}"
        below = (int(batch_size) // n) * n if isinstance(batch_size, (int, np.integer)) else 0
        works = " or ".join(str(b) for b in (below, below + n) if b > 0)
        raise ValueError(f"{name}={batch_size!r} must be a positive multiple of the number of devices ({where}); "
                         f"{works} would work")


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put(x, sharding)``, also for a sharding over other processes' devices (then
    ``x`` must be the same on every process: parameters, an initial state, a learning rate)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of ``mesh`` (params, optimizer state, whole datasets)."""
    sharding = replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: put(x, sharding), tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each array of ``batch`` along axis 0 over the mesh; axis 0 must divide by the device count."""
    for leaf in jax.tree.leaves(batch):
        check_batch_size(int(leaf.shape[0]), mesh, name="batch leading dimension")
    return jax.device_put(batch, batch_sharding(mesh))
