"""``TrainState``: everything a training run changes, in one pytree.

``params``, ``batch_stats``, ``opt_state``, ``step``, the run's base PRNG ``key`` and the
weights' moving average ``ema`` (``{}`` without one) are arrays (so the state can be jitted,
donated, sharded and checkpointed); ``apply_fn`` and ``tx`` are static. The step's randomness
is ``fold_in(key, step)``, never a stored, advancing key, so a run resumed from a checkpoint
repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxcnn import freeze
from jaxcnn.train import recipe, sharding

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """The training state (a pytree; ``apply_fn`` and ``tx`` are static fields).

    Attributes:
      step: int32 scalar, number of train steps (batches) taken: the optimizer's steps, or ``k`` to an
        update with gradient accumulation (``accumulate_gradients``).
      params: model parameters (``variables["params"]``).
      batch_stats: BatchNorm running statistics (``{}`` for models without BN).
      opt_state: ``tx``'s state.
      key: the run's base ``jax.random.key``; step ``s`` uses ``fold_in(key, s)``.
      apply_fn: ``model.apply`` (or a ``functools.partial`` of it with extra keyword
        arguments, e.g. the ResNet's ``frozen_bn``).
      tx: the optimizer (an ``optax.GradientTransformation``).
      ema: ``{}`` (no EMA), or the exponential moving average of the weights,
        ``{"params": ..., "batch_stats": ...}`` (``FitConfig.ema_decay``: ``fit`` adds it with
        :func:`with_ema`, the train step updates it); :func:`ema_view` is the state it evaluates.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    key: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema: PyTree = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, *, apply_fn: Callable, variables: PyTree, tx: optax.GradientTransformation,
               key: jax.Array) -> "TrainState":
        """A fresh state at step 0: ``opt_state = tx.init(variables["params"])``."""
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                   key=key, apply_fn=apply_fn, tx=tx)

    @property
    def variables(self) -> dict:
        """``{"params": ..., "batch_stats": ...}`` (no ``batch_stats`` entry when empty)."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


#: The smallest learning rate taken: float32's smallest normal number (1.2e-38). The steps compute in
#: float32, where a smaller rate is 0 (1e-300 trained nothing) or loses its precision.
MIN_LEARNING_RATE = float(np.finfo(np.float32).tiny)


def check_learning_rate(value, name: str = "learning_rate") -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number >= ``MIN_LEARNING_RATE``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}; must be a finite number > 0")
    if value < MIN_LEARNING_RATE:
        raise ValueError(f"{name}={value!r} is {float(np.float32(value)):g} in float32, where the step computes; "
                         f"must be >= {MIN_LEARNING_RATE:.3g} (float32's smallest normal number)")


def check_weight_decay(value, name: str = "weight_decay") -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number >= 0 (AdamW's decoupled decay; 0: Adam)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}; must be a finite number >= 0 (0: Adam, no decay)")


def adam(learning_rate: float = 1e-3, *, labels: Optional[PyTree] = None,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam whose learning rate lives in the optimizer state (``optax.inject_hyperparams``),
    so callbacks set it between epochs (``set_learning_rate``) and checkpoints keep it.

    ``labels`` (a ``"trainable"``/``"frozen"`` tree, see ``jaxcnn.freeze``) masks frozen
    parameters with ``jaxcnn.freeze.masked``.

    ``weight_decay`` > 0: AdamW (Loshchilov & Hutter 2019; ``optax.adamw``), the update
    ``-lr * (adam + weight_decay * p)`` for the kernels only: biases and BatchNorm's scale / bias
    are not decayed (``jaxcnn.train.recipe.weight_decay_mask``, the usual exclusions). The rate
    sits in the state beside the learning rate (``get_weight_decay``), and ``fit`` records it.
    0 (default): Adam, its state and steps as they were without the argument.
    """
    check_learning_rate(learning_rate, "adam: learning_rate")
    check_weight_decay(weight_decay, "adam: weight_decay")
    if weight_decay:
        tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=float(learning_rate), weight_decay=float(weight_decay), mask=recipe.weight_decay_mask)
    else:
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=float(learning_rate))
    return tx if labels is None else freeze.masked(tx, labels)


def with_ema(state: TrainState, on: bool = True) -> TrainState:
    """``state`` with an EMA of its weights (``state.ema``) that starts at them, as Keras' ``use_ema``
    does (a state that has one keeps it); ``on`` False: without one."""
    if not on:
        return state.replace(ema={})
    if state.ema:
        return state
    # copies: the train step donates the state, and one buffer must not be donated twice
    return state.replace(ema=jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats}))


def ema_view(state: TrainState) -> TrainState:
    """The state a run evaluates: with an EMA, its ``params`` and ``batch_stats`` are the EMA's (and
    it has no ``ema`` of its own); without one, ``state`` itself."""
    if not state.ema:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"], ema={})
def _is_multi_steps_state(x) -> bool:
    return isinstance(x, optax.MultiStepsState)


def accumulate_gradients(state: TrainState, grad_accum_steps: int) -> TrainState:
    """``state`` whose optimizer averages the gradients of ``grad_accum_steps`` (``k``) train steps and
    updates the weights once every ``k`` (``optax.MultiSteps``; what ``fit`` does with
    ``FitConfig.grad_accum_steps``); ``k`` = 1: ``state`` itself.

    The state's optimizer state is kept, inside the ``optax.MultiStepsState`` (``inner_opt_state``),
    beside the running mean of the gradients (``acc_grads``, float32, like ``params``) and the step
    within the ``k`` (``mini_step``; ``gradient_step`` counts the updates). Between two updates the
    optimizer returns zero updates, so the weights stay as they are; a caller that must know whether
    a step changed them (an average of the weights) reads ``opt_state.mini_step == 0`` after it.
    ValueError for a ``k`` that is not an int >= 1, or a state whose optimizer already accumulates.
    """
    if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"accumulate_gradients: grad_accum_steps={grad_accum_steps!r}; must be an int >= 1 (1: off)")
    if any(_is_multi_steps_state(s) for s in jax.tree.leaves(state.opt_state, is_leaf=_is_multi_steps_state)):
        raise ValueError("accumulate_gradients: the state's optimizer already accumulates gradients (an "
                         "optax.MultiSteps state); build it without (jaxcnn.train.adam) and set "
                         "FitConfig.grad_accum_steps")
    if grad_accum_steps == 1:
        return state
    tx = optax.MultiSteps(state.tx, every_k_schedule=grad_accum_steps)
    # (as tx.init(params), with the optimizer state the caller built, its learning rate and all, inside)
    opt_state = optax.MultiStepsState(mini_step=jnp.zeros((), jnp.int32), gradient_step=jnp.zeros((), jnp.int32),
                                      inner_opt_state=state.opt_state,
                                      acc_grads=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                                                             state.params),
                                      skip_state=())
    return state.replace(tx=tx.gradient_transformation(), opt_state=opt_state)


def state_to_tree(state: TrainState) -> dict:
    """The arrays of ``state`` as a plain dict, what a checkpoint stores:
    ``{"step", "params", "batch_stats", "opt_state", "key"}`` (the key as raw key data), and
    ``"ema"`` only when the state has one (a run without EMA stores what it stored before EMA existed)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "key": jax.random.key_data(state.key),
            **({"ema": state.ema} if state.ema else {})}


def state_from_tree(template: TrainState, tree: dict) -> TrainState:
    """Inverse of ``state_to_tree``: ``template`` (same model and optimizer) with ``tree``'s arrays."""
    key = jax.random.wrap_key_data(tree["key"], impl=jax.random.key_impl(template.key))
    return template.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                            opt_state=tree["opt_state"], key=key, ema=tree.get("ema", {}))


def _is_inject_state(x) -> bool:
    return isinstance(x, optax.InjectStatefulHyperparamsState)


def _inject_states(opt_state) -> list:
    return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_inject_state) if _is_inject_state(s)]


def get_learning_rate(opt_state: PyTree) -> float:
    """The learning rate held in an ``optax.inject_hyperparams`` state anywhere inside ``opt_state``."""
    states = _inject_states(opt_state)
    if not states:
        raise ValueError("get_learning_rate: opt_state holds no optax.inject_hyperparams state "
                         "(build the optimizer with jaxcnn.train.adam or optax.inject_hyperparams)")
    return float(states[0].hyperparams["learning_rate"])


def get_weight_decay(opt_state: PyTree) -> float:
    """AdamW's decoupled weight decay held in ``opt_state`` (``adam(weight_decay=...)``); 0.0 for
    an optimizer without one (Adam)."""
    states = _inject_states(opt_state)
    if not states:
        raise ValueError("get_weight_decay: opt_state holds no optax.inject_hyperparams state "
                         "(build the optimizer with jaxcnn.train.adam or optax.inject_hyperparams)")
    return float(states[0].hyperparams.get("weight_decay", 0.0))


def set_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
    """A copy of ``state`` whose every ``inject_hyperparams`` learning rate is ``learning_rate``."""
    if not _inject_states(state.opt_state):
        raise ValueError("set_learning_rate: opt_state holds no optax.inject_hyperparams state")

    def put(s):
        if not _is_inject_state(s):
            return s
        old = s.hyperparams["learning_rate"]
        new = np.asarray(learning_rate, old.dtype)
        new = sharding.put(new, old.sharding) if isinstance(getattr(old, "sharding", None), NamedSharding) \
            else jax.device_put(new, getattr(old, "sharding", None))
        return s._replace(hyperparams={**s.hyperparams, "learning_rate": new})

    return state.replace(opt_state=jax.tree.map(put, state.opt_state, is_leaf=_is_inject_state))
