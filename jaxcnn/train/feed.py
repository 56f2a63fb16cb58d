"""Feeds: a split served as global batches sharded over the ``data`` mesh.

One process (any number of its devices): the whole split lives on every device as uint8
(CIFAR-10 is ~180 MB); batches are gathered there inside a small jitted function and come out
sharded over the ``data`` axis, ready for the jitted step. Each feed compiles its gather once.

Several processes (``jax.distributed``): each holds only its share of the split (every P-th
row, ``jaxcnn.train.distributed.shard``) on the host, and builds its part of every global batch
from it; ``jax.make_array_from_process_local_data`` joins the parts into one global array.
Process ``p``'s rows fill the batch rows of its own devices.

A split on disk (``jaxcnn.data.folder.FileSplit``, the streaming path) is read the same way,
batch by batch: the next batches are decoded in background threads while the device trains
(``prefetch``), and ``wait_s`` counts the time the loop waited for them. The order of the
batches is the in-memory path's, so both paths train on the same batches.

* :class:`TrainFeed` — shuffled batches: epoch ``e``'s order is
  ``permutation(fold_in(shuffle_key(seed), e), n)`` of the ``n`` rows a process holds (all of
  them with one process), the same key on every process; the last incomplete batch is dropped
  (those examples are seen in other epochs).
* :class:`EvalFeed` — every example exactly once: each process pads its rows to the same whole
  number of batches and a ``mask`` marks the real ones; :func:`evaluate` sums over the mask.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data.core import Split
from jaxcnn.train import sharding
from jaxcnn.train.distributed import Processes
from jaxcnn.train.state import TrainState


def shuffle_key(seed: int) -> jax.Array:
    """The key of the epoch permutations (epoch ``e`` uses ``fold_in(shuffle_key(seed), e)``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x5EED)


def _global_batch(mesh, local: dict) -> dict:
    """This process's rows of a batch, as its part of one global array sharded over ``data``."""
    spec = sharding.batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(spec, a), local)


class _HostBatches:
    """Batches built on the host from a split's rows (several processes, or a split on disk),
    read ``prefetch`` batches ahead in a background thread."""

    def __init__(self, split, mesh, prefetch: int):
        self.split, self.mesh, self.prefetch, self.wait_s = split, mesh, prefetch, 0.0

    def _rows(self, rows: np.ndarray, extra: dict) -> dict:
        return {"image": self.split.read(rows), "label": self.split.labels[rows], **extra}

    def batches(self, row_sets: list, extras: Optional[list] = None) -> Iterator[dict]:
        extras = extras or [{}] * len(row_sets)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(self._rows, r, e) for r, e in zip(row_sets[:self.prefetch], extras)]
            for i in range(len(row_sets)):
                if i + self.prefetch < len(row_sets):
                    pending.append(pool.submit(self._rows, row_sets[i + self.prefetch], extras[i + self.prefetch]))
                t = time.perf_counter()
                local = pending[i].result()
                self.wait_s += time.perf_counter() - t
                pending[i] = None
                yield _global_batch(self.mesh, local)


class TrainFeed:
    """A training split served as shuffled global batches sharded over ``mesh``.

    Args:
      split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``: the whole split with one
        process, this process's share with several.
      batch_size: global batch (a multiple of the mesh's device count).
      mesh: a 1-D ``data`` mesh over every device of every process (``jaxcnn.train.make_mesh``).
      seed: the epoch order's seed.
      processes: this process among the run's (default: ``Processes()``).
      prefetch: batches read ahead when the rows come from the host (default 2).

    ``num_examples`` is the global count; ``steps_per_epoch`` is the same on every process.
    """

    def __init__(self, split: Split, batch_size: int, mesh, *, seed: int, processes: Optional[Processes] = None,
                 prefetch: int = 2):
        self.processes = processes = Processes() if processes is None else processes
        sharding.check_batch_size(batch_size, mesh, name="batch_size")
        counts = processes.gather(len(split))
        self.num_examples, self.batch_size, self.num_local = sum(counts), batch_size, len(split)
        if batch_size > self.num_examples:
            raise ValueError(f"batch_size={batch_size} is larger than the training set ({self.num_examples} examples)")
        self.local_batch = batch_size // processes.count
        self.steps_per_epoch = min(counts) // self.local_batch
        self._key = shuffle_key(seed)
        self._mesh = mesh
        self.host = None
        if processes.count > 1 or not isinstance(split, Split):  # rows from the host: each batch built there
            self.host = _HostBatches(split, mesh, prefetch)
            return
        self._arrays = sharding.replicate({"image": split.images, "label": split.labels}, mesh)
        self._replicated = sharding.replicated(mesh)

        @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
        def take(arrays, perm, i):
            idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,)
            return jax.tree.map(lambda a: a[idx], arrays)

        self._take = take

    def permutation(self, epoch: int) -> jax.Array:
        """Epoch ``epoch``'s order of this process's rows, ``(n,)`` int32."""
        return jax.random.permutation(jax.random.fold_in(self._key, epoch), self.num_local)

    def local_indices(self, epoch: int, step: int) -> np.ndarray:
        """The rows of this process's share that form its part of batch ``step`` of ``epoch``."""
        perm = np.asarray(self.permutation(epoch))
        return perm[step * self.local_batch:(step + 1) * self.local_batch]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of epoch ``epoch`` (1-based) from batch ``start`` on (a run resumed
        mid-epoch), ``{"image": (B, H, W, C) uint8, "label": (B,)}`` global arrays."""
        if self.host is not None:
            perm = np.asarray(self.permutation(epoch))
            yield from self.host.batches([perm[i * self.local_batch:(i + 1) * self.local_batch]
                                          for i in range(start, self.steps_per_epoch)])
            return
        perm = jax.device_put(self.permutation(epoch), self._replicated)
        for i in range(start, self.steps_per_epoch):
            yield self._take(self._arrays, perm, i)


class EvalFeed:
    """A split padded to whole batches, with a ``mask`` of its real rows.

    Batches are ``{"image", "label", "mask": bool (B,)}``; :func:`evaluate` counts only masked
    rows, so every example counts exactly once whatever the batch size and process count.
    """

    def __init__(self, split: Split, batch_size: int, mesh, *, processes: Optional[Processes] = None,
                 prefetch: int = 2):
        self.processes = processes = Processes() if processes is None else processes
        sharding.check_batch_size(batch_size, mesh, name="eval_batch_size")
        counts = processes.gather(len(split))
        local_batch = batch_size // processes.count
        n = len(split)
        total = max(1, math.ceil(max(counts) / local_batch)) * local_batch  # the same on every process
        self.num_examples, self.batch_size, self.num_batches = sum(counts), batch_size, total // local_batch
        self._local_batch, self._mesh, self._n = local_batch, mesh, n
        self.host = None
        if processes.count > 1 or not isinstance(split, Split):  # rows from the host, padding rows repeat row 0
            self.host = _HostBatches(split, mesh, prefetch)
            return
        pad = total - n
        images, labels = split.images, split.labels
        arrays = {"image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
                  "label": np.concatenate([labels, np.zeros(pad, labels.dtype)]),
                  "mask": np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])}
        self._arrays = sharding.replicate(arrays, mesh)

        @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
        def take(arrays, start):
            return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch_size), arrays)

        self._take = take

    def batches(self) -> Iterator[dict]:
        if self.host is not None:
            rows, extras = [], []
            for b in range(self.num_batches):
                r = np.arange(b * self._local_batch, (b + 1) * self._local_batch)
                rows.append(np.where(r < self._n, r, 0))  # padding: row 0 again, masked out
                extras.append({"mask": r < self._n})
            yield from self.host.batches(rows, extras)
            return
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
