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
    """Raise ValueError unless ``batch_size`` is a positive multiple of the mesh's device count."""
    n = mesh.devices.size
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0 or batch_size % n:
        raise ValueError(f"{name}={batch_size!r} must be a positive multiple of the number of devices ({n}); "
                         f"pick e.g. {max(n, (int(batch_size) // n) * n if isinstance(batch_size, (int, np.integer)) else n)}")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of ``mesh`` (params, optimizer state, whole datasets)."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each array of ``batch`` along axis 0 over the mesh; axis 0 must divide by the device count."""
    for leaf in jax.tree.leaves(batch):
        check_batch_size(int(leaf.shape[0]), mesh, name="batch leading dimension")
    return jax.device_put(batch, batch_sharding(mesh))
