"""Device-resident data: a split placed once on the devices, served as sharded batches.

The whole split lives on every device of the mesh as uint8 (CIFAR-10 is ~180 MB); batches
are gathered there inside a small jitted function and come out sharded over the ``data``
axis, ready for the jitted step. Each feed compiles its gather once, when built.

* :class:`TrainFeed` — shuffled batches: epoch ``e``'s order is
  ``permutation(fold_in(shuffle_key(seed), e), N)``; the last incomplete batch is dropped
  (those examples are seen in other epochs).
* :class:`EvalFeed` — every example exactly once: the split is padded to a whole number of
  batches and a ``mask`` marks the real rows; :func:`evaluate` sums over the mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data.core import Split
from jaxcnn.train import sharding
from jaxcnn.train.state import TrainState


def shuffle_key(seed: int) -> jax.Array:
    """The key of the epoch permutations (epoch ``e`` uses ``fold_in(shuffle_key(seed), e)``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x5EED)


class TrainFeed:
    """A training split on the devices, served as shuffled batches sharded over ``mesh``.

    Args:
      split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``.
      batch_size: global batch (a multiple of the mesh's device count, at most ``N``).
      mesh: a 1-D ``data`` mesh (``jaxcnn.train.make_mesh``).
      seed: the epoch order's seed.
    """

    def __init__(self, split: Split, batch_size: int, mesh, *, seed: int):
        sharding.check_batch_size(batch_size, mesh, name="batch_size")
        n = len(split)
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the training set ({n} examples)")
        self.num_examples, self.batch_size = n, batch_size
        self.steps_per_epoch = n // batch_size
        self._arrays = sharding.replicate({"image": split.images, "label": split.labels}, mesh)
        self._replicated = sharding.replicated(mesh)
        self._key = shuffle_key(seed)

        @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
        def take(arrays, perm, i):
            idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,)
            return jax.tree.map(lambda a: a[idx], arrays)

        self._take = take

    def permutation(self, epoch: int) -> jax.Array:
        """Epoch ``epoch``'s order of the examples, ``(N,)`` int32 on every device."""
        perm = jax.random.permutation(jax.random.fold_in(self._key, epoch), self.num_examples)
        return jax.device_put(perm, self._replicated)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of epoch ``epoch`` (1-based) from batch ``start`` on (a run resumed
        mid-epoch), ``{"image": (B, H, W, C) uint8, "label": (B,)}``."""
        perm = self.permutation(epoch)
        for i in range(start, self.steps_per_epoch):
            yield self._take(self._arrays, perm, i)


class EvalFeed:
    """A split padded to whole batches on the devices, with a ``mask`` of its real rows.

    Batches are ``{"image", "label", "mask": bool (B,)}``; :func:`evaluate` counts only masked
    rows, so every example counts exactly once whatever the batch size.
    """

    def __init__(self, split: Split, batch_size: int, mesh):
        sharding.check_batch_size(batch_size, mesh, name="eval_batch_size")
        n = len(split)
        total = max(1, math.ceil(n / batch_size)) * batch_size
        pad = total - n
        images, labels = split.images, split.labels
        arrays = {"image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
                  "label": np.concatenate([labels, np.zeros(pad, labels.dtype)]),
                  "mask": np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])}
        self.num_examples, self.batch_size, self.num_batches = n, batch_size, total // batch_size
        self._arrays = sharding.replicate(arrays, mesh)

        @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
        def take(arrays, start):
            return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch_size), arrays)

        self._take = take

    def batches(self) -> Iterator[dict]:
        for b in range(self.num_batches):
            yield self._take(self._arrays, b * self.batch_size)


def evaluate(state: TrainState, feed: EvalFeed, eval_step: Callable) -> dict:
    """``{"loss", "accuracy", "count"}`` over the feed's split, every real example once.

    ``eval_step``: the jitted ``jaxcnn.train.make_eval_step()`` (it returns sums).
    """
    sums = None
    for batch in feed.batches():
        out = eval_step(state, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count, "count": int(count)}
