"""Feeds: a split served as global batches sharded over the ``data`` mesh, in one global order.

**The order does not depend on the layout.** Epoch ``e``'s order is one permutation of the
whole split, ``permutation(fold_in(shuffle_key(seed), e), n)``, computed the same on every
process; global batch ``i`` is rows ``order[i*B:(i+1)*B]``, and its row ``j`` lands on the device
of the mesh that holds position ``j`` of the batch axis. So N processes x D devices train on the
batches of one process x N*D devices (and a run resumed in another layout continues the same
order): each process builds only the positions its own devices hold.

Every process holds the whole split (CIFAR-10 is ~180 MB of uint8), in one of two ways:

* in memory (:class:`jaxcnn.data.Split`): the split lives on every device as uint8, and each
  batch is gathered there by a small jitted function whose output is sharded over ``data``;
* on disk (``jaxcnn.data.folder.FileSplit``, the streaming path): each process decodes the files
  of its positions of the next batches in a background thread (``prefetch``) while the device
  trains; ``wait_s`` counts the time the loop waited for them.

A feed is an index plan (:func:`train_plan`, :func:`eval_plan`: which split rows form each
global batch; pure) read through a batch source (:func:`batch_source`: rows -> sharded arrays):

* :class:`TrainFeed` — shuffled batches; the last incomplete batch is dropped (those examples
  are seen in other epochs).
* :class:`EvalFeed` — every example exactly once, in order: the split is padded to whole batches
  and a ``mask`` marks the real rows; :func:`evaluate` sums over the mask.
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

from jaxcnn.train import sharding
from jaxcnn.train.distributed import Processes
from jaxcnn.train.state import TrainState


def shuffle_key(seed: int) -> jax.Array:
    """The key of the epoch permutations (epoch ``e`` uses ``fold_in(shuffle_key(seed), e)``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x5EED)


# ------------------------------------------------------------------ the index plan (pure, no devices)

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order of a split of ``n`` rows, ``(n,)`` int32: the same on every process."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key(seed), epoch), n))


def train_plan(seed: int, epoch: int, n: int, batch_size: int, start: int = 0) -> np.ndarray:
    """The split rows of epoch ``epoch``'s global batches from batch ``start`` on,
    ``(n // batch_size - start, batch_size)``; the last incomplete batch is dropped."""
    steps = n // batch_size
    return epoch_order(seed, epoch, n)[:steps * batch_size].reshape(steps, batch_size)[start:]


def eval_plan(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, mask)``, each ``(ceil(n / batch_size), batch_size)``: the split in order, padded
    to whole batches with row 0 again, ``mask`` False on the padding."""
    positions = np.arange(max(1, math.ceil(n / batch_size)) * batch_size).reshape(-1, batch_size)
    mask = positions < n
    return np.where(mask, positions, 0), mask


# ------------------------------------------------------------------ batch sources (rows -> global arrays)

def _split_length(split, processes: Processes, what: str) -> int:
    """``len(split)``, checked equal on every process (each holds the whole split)."""
    counts = processes.gather(len(split))
    if len(set(counts)) > 1:
        raise ValueError(f"{what}: the processes hold splits of different sizes ({counts}, by process); every "
                         f"process must load the same data")
    return counts[0]


class _Positions:
    """Which positions of a global batch this process's devices hold, in the order of its shards."""

    def __init__(self, mesh, batch_size: int):
        spec = sharding.batch_sharding(mesh)
        starts = sorted({idx[0].start or 0 for idx in spec.addressable_devices_indices_map((batch_size,)).values()})
        per_device = batch_size // mesh.devices.size
        self.sharding, self.batch_size = spec, batch_size
        self.positions = np.concatenate([np.arange(s, s + per_device) for s in starts])  # (local rows,)
        self._offset = {s: k * per_device for k, s in enumerate(starts)}

    def assemble(self, local: dict) -> dict:
        """Arrays holding this process's positions (in ``positions`` order) as global arrays
        ``(batch_size, ...)`` sharded over ``data``."""

        def one(a):
            def piece(index):
                start, stop = index[0].start or 0, index[0].stop or self.batch_size
                k = self._offset[start]
                return a[k:k + stop - start]

            return jax.make_array_from_callback((self.batch_size, *a.shape[1:]), self.sharding, piece)

        return {k: one(a) for k, a in local.items()}


class ResidentRows:
    """A split held in memory, put once on every device (uint8); each batch is gathered there by a
    jitted function whose output is sharded over ``data``."""

    streamed = False
    wait_s = 0.0

    def __init__(self, split, mesh, batch_size: int):
        self._arrays = sharding.replicate({"image": split.images, "label": split.labels}, mesh)
        self._replicated = sharding.replicated(mesh)

        @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
        def take(arrays, plan, extra, i):  # plan: (k, B) the batches' rows of the split; batch i of them
            rows = plan[i]  # (B,)
            return {**jax.tree.map(lambda a: a[rows], arrays), **jax.tree.map(lambda e: e[i], extra)}

        self._take = take

    def batches(self, plan: np.ndarray, extras: Optional[dict] = None) -> Iterator[dict]:
        """``plan``: ``(k, B)`` the split rows of ``k`` global batches; ``extras``: more per-position
        arrays ``(k, B)`` (the evaluation mask), the same on every process. The plan goes to the
        devices once; each batch is then one jitted gather there."""
        put = functools.partial(sharding.put, sharding=self._replicated)
        plan, extra = put(np.asarray(plan)), jax.tree.map(put, extras or {})
        for i in range(plan.shape[0]):
            yield self._take(self._arrays, plan, extra, i)


class StreamedRows:
    """A split read from disk (``FileSplit``): this process's positions of each batch decoded on
    the host, ``prefetch`` batches ahead in a background thread; ``wait_s`` counts the time the
    loop waited for them."""

    streamed = True

    def __init__(self, split, mesh, batch_size: int, prefetch: int = 2):
        self.split, self.prefetch, self.wait_s = split, prefetch, 0.0
        self.positions = _Positions(mesh, batch_size)

    def _read(self, rows: np.ndarray, extra: dict) -> dict:
        mine = self.positions.positions
        return {"image": self.split.read(rows[mine]), "label": self.split.labels[rows[mine]],
                **{k: v[mine] for k, v in extra.items()}}

    def batches(self, plan: np.ndarray, extras: Optional[dict] = None) -> Iterator[dict]:
        """As :meth:`ResidentRows.batches`."""
        plan, extras = np.asarray(plan), extras or {}
        k = plan.shape[0]
        extra = lambda i: {name: a[i] for name, a in extras.items()}  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(self._read, plan[i], extra(i)) for i in range(min(self.prefetch, k))]
            for i in range(k):
                if i + self.prefetch < k:
                    pending.append(pool.submit(self._read, plan[i + self.prefetch], extra(i + self.prefetch)))
                t = time.perf_counter()
                local = pending[i].result()
                self.wait_s += time.perf_counter() - t
                pending[i] = None
                yield self.positions.assemble(local)


def batch_source(split, mesh, batch_size: int, *, prefetch: int = 2):
    """Where a split's batches come from: :class:`ResidentRows` for a split whose ``images`` are
    in memory (``jaxcnn.data.Split``), :class:`StreamedRows` for one that reads its files as
    batches need them (``jaxcnn.data.folder.FileSplit``, whose ``images`` is None)."""
    if getattr(split, "images", None) is not None:
        return ResidentRows(split, mesh, batch_size)
    return StreamedRows(split, mesh, batch_size, prefetch)


# ------------------------------------------------------------------ the feeds: a plan and a source

class TrainFeed:
    """A training split served as shuffled global batches sharded over ``mesh``.

    Args:
      split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)`` (a ``Split`` in memory, or
        a ``FileSplit`` read from disk): the whole split, on every process.
      batch_size: global batch (a multiple of the mesh's device count).
      mesh: a 1-D ``data`` mesh over every device of every process (``jaxcnn.train.make_mesh``).
      seed: the epoch order's seed.
      processes: this process among the run's (default: ``Processes()``).
      prefetch: batches read ahead when they come from disk (default 2).

    ``num_examples`` is the split's size, ``steps_per_epoch`` = ``num_examples // batch_size``;
    ``source.streamed`` / ``source.wait_s``: whether batches are read from disk, and the time
    spent waiting for them.
    """

    def __init__(self, split, batch_size: int, mesh, *, seed: int, processes: Optional[Processes] = None,
                 prefetch: int = 2):
        self.processes = processes = Processes() if processes is None else processes
        sharding.check_batch_size(batch_size, mesh, name="batch_size")
        self.num_examples = _split_length(split, processes, "TrainFeed")
        if batch_size > self.num_examples:
            raise ValueError(f"batch_size={batch_size} is larger than the training set ({self.num_examples} examples)")
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = self.num_examples // batch_size
        self.source = batch_source(split, mesh, batch_size, prefetch=prefetch)

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the whole split, ``(num_examples,)`` int32."""
        return epoch_order(self.seed, epoch, self.num_examples)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The batches of epoch ``epoch`` (1-based) from batch ``start`` on (a run resumed
        mid-epoch), ``{"image": (B, H, W, C) uint8, "label": (B,)}`` global arrays."""
        yield from self.source.batches(train_plan(self.seed, epoch, self.num_examples, self.batch_size, start))

    def first_batches(self, epoch: int, count: int) -> Iterator[dict]:
        """The first ``count`` batches of epoch ``epoch`` (at most the epoch's), reading no others."""
        yield from self.source.batches(train_plan(self.seed, epoch, self.num_examples, self.batch_size)[:count])


class EvalFeed:
    """A split padded to whole batches, with a ``mask`` of its real rows.

    Batches are ``{"image", "label", "mask": bool (B,)}``: batch ``b`` is rows ``b*B .. b*B+B-1``
    of the split, those past its end masked out (:func:`eval_plan`). :func:`evaluate` counts only
    masked rows, so every example counts exactly once whatever the batch size, device and
    process count.
    """

    def __init__(self, split, batch_size: int, mesh, *, processes: Optional[Processes] = None,
                 prefetch: int = 2):
        self.processes = processes = Processes() if processes is None else processes
        sharding.check_batch_size(batch_size, mesh, name="eval_batch_size")
        self.num_examples = _split_length(split, processes, "EvalFeed")
        self.batch_size = batch_size
        self._rows, self._mask = eval_plan(self.num_examples, batch_size)
        self.num_batches = len(self._rows)
        self.source = batch_source(split, mesh, batch_size, prefetch=prefetch)

    def batches(self) -> Iterator[dict]:
        yield from self.source.batches(self._rows, {"mask": self._mask})


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
