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

    labels = label_tree(params, first_n_keras_layers(100, model.backbone.layer_order()))  # = base_model.layers[:100]
    labels = label_tree(params, by_prefix("conv1", "conv2"))
    labels = label_tree(params, by_pattern(r"_bn$"))
    labels = label_tree(params, backbone())                   # everything under "backbone"
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

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


def apply_trainable_updates(params: PyTree, updates: PyTree, labels: PyTree) -> PyTree:
    """``optax.apply_updates`` for trainable leaves; frozen leaves are returned as they are.

    With ``masked`` the frozen updates are zeros, and ``p + 0`` is ``p`` except for ``-0.0``
    (which becomes ``+0.0``); this keeps every frozen array bitwise identical by construction.
    """
    trainable, frozen = partition(params, labels)
    t_updates, _ = partition(updates, labels)
    return combine(optax.apply_updates(trainable, t_updates), frozen)


def masked(tx: optax.GradientTransformation, labels: PyTree) -> optax.GradientTransformation:
    """``tx`` for trainable leaves, ``optax.set_to_zero()`` for frozen ones.

    This is ``optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)``;
    optax keeps ``MaskedNode()`` (no arrays) in ``tx``'s state for every frozen leaf, so the
    optimizer state costs nothing for frozen layers.
    """
    _check_labels(labels)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which layers to freeze. ``frozen(path) -> bool`` per layer.

    ``path`` is the layer's module path in ``params`` (``("backbone", "conv1_conv")`` or
    ``("conv1_conv",)``); its last element is the layer name. Build rules with
    ``first_n_keras_layers``, ``by_prefix``, ``by_pattern``, ``backbone``, ``nothing``;
    combine them with ``|`` (freeze what either freezes).
    """

    description: str
    frozen: Callable[[tuple[str, ...]], bool]
    must_match: bool = True  # label_tree raises if the rule freezes no layer (a typo)

    def __or__(self, other: "Rule") -> "Rule":
        if not isinstance(other, Rule):
            return NotImplemented
        return Rule(
            f"{self.description} | {other.description}",
            lambda path: self.frozen(path) or other.frozen(path),
            self.must_match or other.must_match,
        )


def first_n_keras_layers(n: int, layer_order: Sequence[str]) -> Rule:
    """Freeze what ``for layer in base_model.layers[:n]: layer.trainable = False`` freezes.

    Args:
      n: how many Keras layers, counted in ``model.layers`` order, weightless ones included
        (input, padding, activation, add, pooling): for ResNet50 ``n=100`` ends at
        ``conv4_block2_3_conv`` (index 99), so ``conv4_block2_3_bn`` stays trainable.
      layer_order: the Keras model's layer names in ``model.layers`` order, e.g.
        ``ResNet50(include_top=False).layer_order()`` or a ``Classifier``'s
        ``model.backbone.layer_order()``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"first_n_keras_layers: n must be an int >= 0, got {n!r}")
    if isinstance(layer_order, str) or not isinstance(layer_order, Sequence) or \
            not all(isinstance(name, str) for name in layer_order):
        raise TypeError(f"first_n_keras_layers: layer_order must be a sequence of layer names, got "
                        f"{type(layer_order).__name__}")
    if n > len(layer_order):
        raise ValueError(f"first_n_keras_layers: n={n} but layer_order has only {len(layer_order)} layers")
    names = frozenset(layer_order[:n])
    return Rule(f"first_n_keras_layers({n})", lambda path: path[-1] in names, must_match=n > 0)


def by_prefix(*prefixes: str) -> Rule:
    """Freeze layers whose name (or ``/``-joined module path) starts with any of ``prefixes``.

    ``by_prefix("conv1", "conv2")`` freezes the stem and the first stage.
    """
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"by_prefix: give one or more non-empty strings, got {prefixes!r}")
    return Rule(
        f"by_prefix{prefixes!r}",
        lambda path: any(path[-1].startswith(p) or "/".join(path).startswith(p) for p in prefixes),
    )


def by_pattern(regex: str) -> Rule:
    """Freeze layers whose name or ``/``-joined module path matches ``regex`` (``re.search``).

    ``by_pattern(r"_bn$")`` freezes every BatchNorm layer; ``by_pattern(r"^conv[234]_")``
    the first three stages.
    """
    if not isinstance(regex, str):
        raise TypeError(f"by_pattern: regex must be a str, got {type(regex).__name__}")
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise ValueError(f"by_pattern: invalid regex {regex!r}: {e}") from None
    return Rule(
        f"by_pattern({regex!r})",
        lambda path: bool(pat.search(path[-1]) or pat.search("/".join(path))),
    )


def backbone(name: str = "backbone") -> Rule:
    """Freeze everything under the top-level submodule ``name`` (the pretrained ResNet of a
    fine-tuning model ``{"backbone": ..., "head": ...}``); Keras' ``base_model.trainable = False``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone: name must be a non-empty str, got {name!r}")
    return Rule(f"backbone({name!r})", lambda path: len(path) > 1 and path[0] == name)


def nothing() -> Rule:
    """Freeze nothing: every parameter trainable."""
    return Rule("nothing()", lambda path: False, must_match=False)


# --------------------------------------------------------------------------- label trees


def _layers(tree: PyTree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    """{module path: {variable name: leaf}} for a nested dict of variables."""
    out: dict[tuple[str, ...], dict] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_layers(v, prefix + (str(k),)))
        else:
            out.setdefault(prefix, {})[k] = v
    return out


def label_tree(params: PyTree, rule: Rule) -> PyTree:
    """Labels for ``params``: ``"frozen"`` where ``rule`` freezes the layer, else ``"trainable"``.

    Args:
      params: nested dict of parameters (``variables["params"]``), layers keyed by name.
      rule: a ``Rule`` (``first_n_keras_layers(100, order)``, ``backbone()``, ...).

    Returns:
      A tree of the same structure as ``params`` with string leaves.

    Raises:
      ValueError: the rule freezes no layer although it names some (a typo in a prefix, or
        a layer order that matches none of ``params``' layers).
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"label_tree: rule must be a jaxcnn.freeze.Rule, got {type(rule).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"label_tree: params must be a nested dict, got {type(params).__name__}")
    layers = _layers(params)
    frozen_paths = {path for path in layers if path and rule.frozen(path)}
    if rule.must_match and not frozen_paths:
        raise ValueError(
            f"label_tree: {rule.description} freezes no layer of params (layers: "
            f"{['/'.join(p) for p in list(layers)[:6]]} ...)"
        )

    def build(tree, prefix):
        return {
            k: build(v, prefix + (str(k),)) if isinstance(v, Mapping) else (FROZEN if prefix in frozen_paths else TRAINABLE)
            for k, v in tree.items()
        }

    return build(params, ())


def frozen_layer_names(labels: PyTree, *, under: Optional[str] = None) -> frozenset[str]:
    """Names of the layers whose variables are all frozen: pass it as ``frozen_bn=`` to the
    model so that their BatchNorm runs in inference mode (running statistics used, not
    updated), as Keras does for ``layer.trainable = False``.

    Args:
      labels: a label tree (``label_tree``).
      under: only layers inside this top-level submodule (e.g. ``"backbone"``), whose names
        are then the backbone's own layer names.
    """
    _check_labels(labels)
    if under is not None:
        if under not in labels:
            raise ValueError(f"frozen_layer_names: under={under!r} is not a top-level key of labels ({sorted(labels)[:8]})")
        labels = labels[under]
    return frozenset(
        path[-1] for path, leaves in _layers(labels).items() if path and all(v == FROZEN for v in leaves.values())
    )


# --------------------------------------------------------------------------- counting


def count_params(params: PyTree, batch_stats: PyTree, labels: PyTree) -> tuple[int, int]:
    """``(trainable, non_trainable)`` counts as Keras reports them: frozen parameters and
    every BatchNorm moving mean / variance (``batch_stats``) are non-trainable."""
    _check_labels(labels)
    sizes = jax.tree.map(lambda lab, p: (lab, int(p.size)), labels, params)
    pairs = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    trainable = sum(n for lab, n in pairs if lab == TRAINABLE)
    frozen = sum(n for lab, n in pairs if lab == FROZEN)
    stats = sum(int(x.size) for x in jax.tree.leaves(batch_stats or {}))
    return trainable, frozen + stats


def summary(
    params: PyTree, batch_stats: PyTree, labels: PyTree, *, layer_order: Optional[Sequence[str]] = None
) -> str:
    """A Keras-like summary: one row per layer (parameters, trainable or not), then the totals
    ``Total params / Trainable params / Non-trainable params`` as ``model.summary()`` prints them.

    Rows follow ``layer_order`` (a model's ``layer_order()``) where a layer is in it, then
    the order of ``params`` (the order the model created its layers).
    """
    _check_labels(labels)
    order = {n: i for i, n in enumerate(layer_order or ())}
    p_layers, l_layers = _layers(params), _layers(labels)
    s_layers = _layers(batch_stats or {})
    made = {path: i for i, path in enumerate(list(p_layers) + [q for q in s_layers if q not in p_layers])}
    paths = sorted(made, key=lambda p: (order.get(p[-1] if p else "", len(order)), made[p]))
    rows = []
    for path in paths:
        n = sum(int(v.size) for v in p_layers.get(path, {}).values())
        n += sum(int(v.size) for v in s_layers.get(path, {}).values())
        labs = set(l_layers.get(path, {}).values())
        state = "frozen" if labs == {FROZEN} else "trainable" if labs == {TRAINABLE} else "mixed" if labs else "-"
        rows.append(("/".join(path), f"{n:,}", state))
    trainable, non_trainable = count_params(params, batch_stats, labels)
    total = trainable + non_trainable
    width = max([len(r[0]) for r in rows] + [len("Layer")])
    lines = [f"{'Layer':<{width}}  {'Param #':>12}  State", "-" * (width + 25)]
    lines += [f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    lines += [
        "-" * (width + 25),
        f"Total params: {total:,} ({total * 4 / 2**20:.2f} MB)",
        f"Trainable params: {trainable:,} ({trainable * 4 / 2**20:.2f} MB)",
        f"Non-trainable params: {non_trainable:,} ({non_trainable * 4 / 2**20:.2f} MB)",
    ]
    return "\n".join(lines)
