"""Precise BatchNorm: population statistics re-estimated over training batches with the weights fixed.

BatchNorm's moving statistics are an exponential average with momentum 0.99 (Keras' default,
the seed's): after a few hundred steps they still mix in batches seen under much older weights,
so early in a run the model that is evaluated (validation loss, early stopping, the best
checkpoint) is not the model that was trained. Precise BatchNorm (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021; pycls and detectron2 do it) replaces them, before an evaluation, by
the average over ``num_batches`` training batches of each batch's mean and variance, computed
with the current weights, in the same train-mode forward pass the step runs.

Each batch's statistics come from the model's own BatchNorm update,
``new = momentum * old + (1 - momentum) * batch``, solved for ``batch``; a layer whose
statistics do not move (a frozen BatchNorm) keeps its own, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxcnn.preprocess import scale_to_unit
from jaxcnn.train.state import TrainState


def make_batch_stats_step(momentum: float, *, preprocess: Callable = scale_to_unit) -> Callable:
    """``step(state, batch, key) -> (batch_stats, moved)``: each BatchNorm layer's mean and variance
    over ``batch`` (the train-mode forward pass, dropout on, no augmentation) and, per leaf,
    whether the layer updates them at all. Pure; jit it."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"make_batch_stats_step: momentum={momentum!r}; must be in [0, 1)")

    def step(state: TrainState, batch: dict, key: jax.Array):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        _, out = state.apply_fn(variables, preprocess(batch["image"]), train=True, rngs={"dropout": key},
                                mutable=["batch_stats"])
        new = out["batch_stats"]
        # new = m * old + (1 - m) * batch  =>  batch = (new - m * old) / (1 - m)
        stats = jax.tree.map(lambda n, o: (n - momentum * o) / (1.0 - momentum), new, state.batch_stats)
        moved = jax.tree.map(lambda n, o: jnp.any(n != o), new, state.batch_stats)
        return stats, moved

    return step


def precise_batch_stats(state: TrainState, batches: Iterable[dict], *, momentum: float,
                        num_batches: int, step: Optional[Callable] = None, seed: int = 0,
                        key: Optional[jax.Array] = None) -> dict:
    """The population statistics of ``state``'s BatchNorm layers re-estimated over ``num_batches``
    of ``batches`` (``{"image": uint8 (B, H, W, C), ...}``, e.g. ``TrainFeed.epoch(...)``).

    ``mean`` = the average of the batches' means, ``var`` = the average of their (biased)
    variances, as pycls and detectron2 do. A layer that did not move its statistics (frozen)
    keeps ``state.batch_stats`` exactly. ``momentum``: the model's BatchNorm momentum (the
    ``bn_momentum`` of ``jaxcnn.models``). ``step``: a jitted :func:`make_batch_stats_step`
    (built here when None). The dropout key of batch ``i`` is ``fold_in(key, i)``, ``key``
    default ``jax.random.key(seed)``. Returns a tree like ``state.batch_stats``.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"precise_batch_stats: num_batches={num_batches!r}; must be an int >= 1")
    if not state.batch_stats:
        return state.batch_stats
    step = jax.jit(make_batch_stats_step(momentum)) if step is None else step
    total, moved, count = None, None, 0
    key = jax.random.key(seed) if key is None else key
    for batch in batches:
        stats, m = step(state, batch, jax.random.fold_in(key, count))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        moved = m if moved is None else jax.tree.map(jnp.logical_or, moved, m)
        count += 1
        if count == num_batches:
            break
    if count == 0:
        raise ValueError("precise_batch_stats: batches is empty")
    return jax.tree.map(lambda t, m, old: jnp.where(m, t / count, old), total, moved, state.batch_stats)


def bn_momentum_of(spec: Optional[dict]) -> float:
    """The BatchNorm momentum of a model spec (``jaxcnn.models.model_spec``; nested specs
    searched): ValueError when the spec names none, or several different ones."""
    found = set()

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("bn_momentum"), (int, float)):
                found.add(float(v["bn_momentum"]))
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(spec)
    if len(found) != 1:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        raise ValueError(f"precise BatchNorm needs the model's BatchNorm momentum, but the model (kind {kind!r}) "
                         + ("records none" if not found else f"records several ({sorted(found)})")
                         + ": use precise_bn_batches=0 with it")
    return found.pop()


def batches_in_epoch(num_batches: int, steps_per_epoch: int, what: str) -> tuple[int, Optional[str]]:
    """``(batches, note)``: the re-estimate reads the first batches of the epoch just trained, so it
    uses at most the epoch's ``steps_per_epoch``: ``(num_batches, None)`` when the epoch has them,
    else ``(steps_per_epoch, note)`` with a one-line note starting with ``what`` (the setting as the
    caller names it, ``"--precise_bn 100"``), so that the run records and says what it uses."""
    if num_batches <= steps_per_epoch or steps_per_epoch < 1:  # (an epoch without a batch is refused elsewhere)
        return num_batches, None
    return steps_per_epoch, f"{what}: an epoch has only {steps_per_epoch} batches; using {steps_per_epoch}"


def make_reestimate(momentum: float, num_batches: int, *, preprocess: Callable = scale_to_unit) -> Callable:
    """``reestimate(state, feed, epoch) -> batch_stats``: :func:`precise_batch_stats` over the first
    ``num_batches`` batches of ``feed``'s epoch ``epoch`` (a ``TrainFeed``), the dropout keys
    from ``fold_in(state.key, epoch)``: everything depends on (seed, epoch) only. The step is
    jitted once, here."""
    step = jax.jit(make_batch_stats_step(momentum, preprocess=preprocess))

    def reestimate(state: TrainState, feed, epoch: int) -> dict:
        key = jax.random.fold_in(jax.random.fold_in(state.key, 0xB4), epoch)
        return precise_batch_stats(state, feed.first_batches(epoch, num_batches), momentum=momentum,
                                   num_batches=num_batches, step=step, key=key)

    return reestimate
