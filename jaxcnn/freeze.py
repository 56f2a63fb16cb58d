"""Freezing layers: parameter label trees, optimizer masks, and trainable/frozen splits.

A *label tree* has the structure of ``params`` and holds ``"trainable"`` or ``"frozen"``
at every leaf. It drives three things, all from the same tree:

* the optimizer mask — ``masked(tx, labels)`` is ``optax.multi_transform`` (an alias of
  ``optax.partition`` in optax 0.2.8) with ``optax.set_to_zero()`` for frozen leaves, so the
  optimizer keeps no state for them;
* the gradient split — ``partition(params, labels) -> (trainable, frozen)``; a train step
  differentiates only w.r.t. ``trainable`` (``combine`` puts the tree back together), so a
  frozen layer costs its forward pass and nothing of the weight gradient;
* BatchNorm mode — ``frozen_layer_names(labels)`` is the set of layers whose BN runs in
  inference mode (running statistics used and not updated), as Keras does for
  ``layer.trainable = False``.

Rules decide per *layer* (a Flax submodule, named as the Keras layer, e.g.
``conv4_block2_3_conv``), never per variable, because Keras' ``trainable`` is per layer::

    labels = label_tree(params, first_n_keras_layers(100))   # = base_model.layers[:100]
    labels = label_tree(params, by_prefix("conv1", "conv2"))
    labels = label_tree(params, by_pattern(r"_bn$"))
    labels = label_tree(params, backbone())                   # everything under "backbone"
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"

PyTree = Any


# --------------------------------------------------------------------------- splits


def _check_labels(labels: PyTree) -> None:
    bad = {lab for lab in jax.tree.leaves(labels) if lab not in (TRAINABLE, FROZEN)}
    if bad:
        raise ValueError(
            f"labels: leaves must be {TRAINABLE!r} or {FROZEN!r}, got {sorted(map(repr, bad))}"
        )


def partition(params: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
    """Split ``params`` into ``(trainable, frozen)`` by a label tree.

    Both halves keep the full nested-dict structure of ``params``; a leaf that belongs to the
    other half is ``None`` (an empty pytree node to JAX), so both are ordinary jit-friendly
    pytrees and ``jax.grad`` w.r.t. ``trainable`` differentiates only the trainable arrays.
    ``combine(*partition(params, labels))`` is ``params`` exactly (same arrays, same structure).

    Args:
      params: parameter pytree (nested dicts of arrays), e.g. ``variables["params"]``.
      labels: same structure, leaves ``"trainable"`` / ``"frozen"`` (see ``label_tree``).
    """
    _check_labels(labels)
    trainable = jax.tree.map(lambda lab, p: p if lab == TRAINABLE else None, labels, params)
    frozen = jax.tree.map(lambda lab, p: p if lab == FROZEN else None, labels, params)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of ``partition``: fill each ``None`` of ``trainable`` from ``frozen``.

    Also merges gradients: ``combine(grads_of_trainable, zeros_like(frozen))`` is a full
    gradient tree for an optimizer built with ``masked`` (see ``fill_frozen``).
    """

    def pick(t, f):
        if t is not None and f is not None:
            raise ValueError("combine: a leaf is present in both trainable and frozen")
        if t is None and f is None:
            raise ValueError("combine: a leaf is missing from both trainable and frozen")
        return t if t is not None else f

    return jax.tree.map(pick, trainable, frozen, is_leaf=lambda x: x is None)


def fill_frozen(trainable_grads: PyTree, frozen: PyTree) -> PyTree:
    """Full-structure gradients: the trainable gradients, zeros for the frozen leaves.

    Use it to hand gradients taken w.r.t. ``trainable`` to an optimizer built with
    ``masked(tx, labels)`` (which sets frozen updates to zero anyway; inside jit the zeros
    cost nothing worth measuring).
    """
    return combine(trainable_grads, jax.tree.map(jnp.zeros_like, frozen))


def masked(tx: optax.GradientTransformation, labels: PyTree) -> optax.GradientTransformation:
    """``tx`` for trainable leaves, ``optax.set_to_zero()`` for frozen ones.

    This is ``optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)``;
    optax keeps ``MaskedNode()`` (no arrays) in ``tx``'s state for every frozen leaf, so the
    optimizer state costs nothing for frozen layers.
    """
    _check_labels(labels)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
