"""Pure train and eval steps, built once per run and jitted by the caller (``jaxcnn.train.fit`` does).

A batch is a dict of device arrays::

    {"image": uint8 (B, H, W, C), "label": int32 (B,)}                     # train
    {"image": uint8 (B, H, W, C), "label": int32 (B,), "mask": bool (B,)}   # eval

Images stay uint8 until here; ``preprocess`` (default ``scale_to_unit``: ``x / 255``) turns
them into floats inside the step, then ``augment_fn`` (train only) runs on the device.
The step's keys are ``fold_in(state.key, state.step)`` split into (dropout, augment),
so they depend on (seed, step) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn import freeze, tta
from jaxcnn.data.augment import AugmentConfig
from jaxcnn.preprocess import get_preprocess, scale_to_unit
from jaxcnn.train import recipe
from jaxcnn.train.state import TrainState

PyTree = Any


def step_keys(key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dropout_key, augment_key)`` of optimizer step ``step``: ``split(fold_in(key, step))``."""
    k = jax.random.fold_in(key, step)
    dropout_key, augment_key = jax.random.split(k)
    return dropout_key, augment_key


def _forward(state: TrainState, params, images, *, train: bool, dropout_key=None):
    """Float32 logits ``(B, K)`` (whatever the model computes in: the loss is float32) and the
    new batch_stats (unchanged when ``train`` is False or no BN)."""
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if not train:
        return state.apply_fn(variables, images, train=False).astype(jnp.float32), state.batch_stats
    mutable = ["batch_stats"] if state.batch_stats else False
    out = state.apply_fn(variables, images, train=True, rngs={"dropout": dropout_key}, mutable=mutable)
    logits, new_stats = (out[0], out[1]["batch_stats"]) if state.batch_stats else (out, state.batch_stats)
    return logits.astype(jnp.float32), new_stats


#: What ``fold_in`` adds to a step's augment key for its mixup / cutmix key (a stream of its own:
#: the dropout and augment keys of a run without mixing stay what they were).
MIX_STREAM = 0x6D6978


def make_train_step(*, labels: Optional[PyTree] = None, augment_fn: Optional[Callable] = None,
                    preprocess: Callable = scale_to_unit, class_weights=None, num_classes: Optional[int] = None,
                    label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                    lr_scale: Optional[Callable] = None, ema_decay: float = 0.0) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with ``donate_argnums=0``.

    Args:
      labels: ``None`` to train every parameter; or a ``"trainable"``/``"frozen"`` label tree
        (``jaxcnn.freeze``): the gradient is taken **only** w.r.t. the trainable part (the
        frozen part is closed over, so frozen layers cost their forward pass), and the
        update goes through the optimizer's mask (build ``tx`` with ``adam(labels=...)``).
      augment_fn: ``augment_fn(key, images) -> images`` on float ``(B, H, W, C)``, e.g.
        ``functools.partial(jaxcnn.data.augment.random_augment, rotation=15.0)``; None: no augmentation.
      preprocess: uint8 images -> float model input (default ``scale_to_unit``).
      class_weights: float ``(K,)``: each example's cross-entropy is multiplied by its class's
        weight before the batch mean (Keras' ``class_weight``); None: all 1. With soft targets
        (below) an example's weight is its target's mix of class weights, ``targets @ weights``.
      num_classes: K, needed by the soft targets below.
      label_smoothing: ``s`` in [0, 1): the targets are ``(1 - s) one_hot + s / K``
        (``jaxcnn.train.recipe.smoothed_targets``).
      mixup_alpha, cutmix_alpha: > 0 mixes each batch after augmentation (``recipe.mix_batch``: mixup,
        cutmix, or one of the two at random when both are given), keyed by
        ``fold_in(augment_key, MIX_STREAM)``. All three 0: integer labels, as without them.
      lr_scale: a schedule ``f(step)`` (``optax.Schedule``, e.g. ``recipe.warmup_cosine(1.0, ...)``):
        the optimizer's updates of step ``state.step`` are multiplied by ``f(state.step)``. For Adam
        and AdamW the update is linear in the learning rate, so this is the rate ``lr * f(step)``
        (weight decay scaled with it, as optax's scheduled AdamW does). None: the optimizer's rate.
      ema_decay: ``d`` in (0, 1): after the optimizer's update, ``state.ema`` (``jaxcnn.train.state.with_ema``)
        becomes ``d * ema + (1 - d) * new`` of the new params and batch_stats (:func:`advance_ema`); with
        gradient accumulation (an ``optax.MultiSteps`` state) only at the steps that update the weights.
        0: the EMA is not touched.

    ``metrics``: ``{"loss": the (weighted) mean softmax cross-entropy against the targets, "accuracy":
    fraction of the batch's own labels predicted}`` (of the mixed images, when mixing).
    """
    soft = bool(label_smoothing or mixup_alpha or cutmix_alpha)
    if soft and not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"make_train_step: label smoothing, mixup and cutmix need num_classes= (>= 2), got "
                         f"{num_classes!r}")
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
        raise ValueError(f"make_train_step: ema_decay={ema_decay!r}; must be 0 (off) or a number in (0, 1)")
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_key, augment_key = step_keys(state.key, state.step)
        images = preprocess(batch["image"])  # (B, H, W, C) float
        if augment_fn is not None:
            images = augment_fn(augment_key, images)
        targets = batch["label"]  # (B,)
        if soft:
            soft_targets = recipe.smoothed_targets(targets, num_classes, label_smoothing)  # (B, K)
            images, soft_targets = recipe.mix_batch(jax.random.fold_in(augment_key, MIX_STREAM), images,
                                                    soft_targets, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)

        def loss_fn(params):
            logits, new_stats = _forward(state, params, images, train=True, dropout_key=dropout_key)
            if soft:
                losses = recipe.soft_cross_entropy(logits, soft_targets)  # (B,)
                loss = (losses if weights is None else losses * (soft_targets @ weights)).mean()
            else:
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B,)
                loss = (losses if weights is None else losses * weights[targets]).mean()
            return loss, (logits, new_stats)

        if labels is None:
            (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        else:
            trainable, frozen = freeze.partition(state.params, labels)
            (loss, (logits, new_stats)), t_grads = jax.value_and_grad(
                lambda t: loss_fn(freeze.combine(t, frozen)), has_aux=True)(trainable)
            grads = freeze.fill_frozen(t_grads, frozen)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:  # the rate of this step: lr * f(step)
            scale = lr_scale(state.step)
            updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
        if labels is None:
            params = optax.apply_updates(state.params, updates)
        else:  # (the frozen arrays are kept as they are, whatever their updates)
            params = freeze.apply_trainable_updates(state.params, updates, labels)

        accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        if ema_decay:
            if not state.ema:
                raise ValueError(f"train_step: ema_decay={ema_decay} but the state has no EMA; add it with "
                                 f"jaxcnn.train.state.with_ema(state) (fit does)")
            ema = advance_ema(state.ema, params, new_stats, ema_decay)
            if isinstance(opt_state, optax.MultiStepsState):  # accumulating: the EMA moves with the weights only
                updated = opt_state.mini_step == 0  # (this step's update changed the weights)
                ema = jax.tree.map(lambda a, e: jnp.where(updated, a, e), ema, state.ema)
            new_state = new_state.replace(ema=ema)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def advance_ema(ema: dict, params: PyTree, batch_stats: PyTree, decay: float) -> dict:
    """The EMA ``{"params", "batch_stats"}`` after a step that made ``params`` and ``batch_stats``:
    ``decay * ema + (1 - decay) * new`` (``recipe.ema_update``), leaf by leaf; an entry already equal
    to its new value (a frozen layer's) is kept exactly, not rounded away from it step after step.

    One function for the update, so that a step which leaves the weights as they are (one that only
    accumulates gradients) can leave the EMA too: ``jnp.where(updated, advance_ema(...), ema)``."""
    new = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda e, n, avg: jnp.where(n == e, e, avg), ema, new, recipe.ema_update(ema, new, decay))


def make_eval_step(*, preprocess: Callable = scale_to_unit, flip_tta: bool = False) -> Callable:
    """``eval_step(state, batch) -> sums``, pure (inference mode: no dropout, BN running stats).

    ``batch["mask"]`` (bool ``(B,)``, optional) marks real examples; padding rows count for
    nothing. Returns sums, so that a whole set is evaluated exactly once whatever the batch:
    ``{"loss_sum", "correct", "count"}`` (float32 scalars); loss = loss_sum / count.

    ``flip_tta``: score each image by the mean ``p`` of the softmaxes of it and its left-right mirror
    (``jaxcnn.tta.flip_tta_log_probs``, two forward passes): its loss is ``-log p[label]``, it is
    correct when ``argmax p`` is its label. False: the softmax cross-entropy of one view's logits.
    """

    def eval_step(state: TrainState, batch: dict) -> dict:
        images = preprocess(batch["image"])
        if flip_tta:  # (B, K) log mean probabilities: taken as logits below (log_softmax leaves them as they are)
            logits = tta.flip_tta_log_probs(lambda x: _forward(state, state.params, x, train=False)[0], images)
        else:
            logits, _ = _forward(state, state.params, images, train=False)
        targets = batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B,)
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return {"loss_sum": jnp.sum(jnp.where(mask > 0, losses, 0.0)), "correct": jnp.sum(correct * mask),
                "count": jnp.sum(mask)}

    return eval_step


#: ``FitConfig``'s settings of the train step's soft targets (0: off).
SOFT_TARGETS = ("label_smoothing", "mixup_alpha", "cutmix_alpha")


@dataclasses.dataclass(frozen=True)
class Steps:
    """The steps of a ``fit`` and the settings they apply: one value, so that what ``config.json``
    records (``FitConfig.augment``, ``FitConfig.preprocess``) is what ran (``fit`` checks it).

    Attributes:
      train: ``(state, batch) -> (state, metrics)``, jitted with ``donate_argnums=0`` (a plain
        function is jitted so here).
      eval: ``(state, batch) -> sums`` (``make_eval_step``), jitted.
      augment: the ``AugmentConfig`` the train step applies (None: none).
      preprocess: the name of the input preprocessing both steps apply (``jaxcnn.preprocess``).
      labels: the ``"trainable"``/``"frozen"`` label tree the train step freezes by, or None.
      class_weight: ``None`` or ``"balanced"`` (``FitConfig.class_weight``), and ``class_weights``
        the per-class loss weights it gave (``balanced_class_weights``).
      label_smoothing, mixup_alpha, cutmix_alpha: the soft targets the train step trains on
        (``FitConfig``'s; 0: off).
      ema_decay: ``FitConfig.ema_decay``: the EMA the train step keeps (0: none).
      flip_tta: whether the eval step (and ``make_logits_fn`` of the end-of-run scores) predicts with
        the mean softmax of each image and its mirror (``FitConfig.flip_tta``).
      lr_schedule: ``FitConfig.lr_schedule``; with ``"cosine"``, ``schedule_steps`` is
        ``(total_steps, warmup_steps)`` of the warm-up + cosine the train step scales its updates by
        (``epochs`` and ``warmup_epochs`` times the steps per epoch, in optimizer updates: divided by
        ``grad_accum_steps``, rounded down), and :meth:`lr_scale` its value.
      grad_accum_steps: ``FitConfig.grad_accum_steps``: the train steps to an optimizer update (the
        schedule's step of train step ``s`` is ``s // grad_accum_steps``; ``fit`` wraps the optimizer).

    Build them with :meth:`build`; to wrap a step (a test, a study sharing compiled steps over
    runs), ``dataclasses.replace(steps, train=wrapper)`` keeps the settings.
    """

    train: Callable
    eval: Callable
    augment: Optional[AugmentConfig] = None
    preprocess: str = "unit"
    labels: Optional[PyTree] = None
    class_weight: Optional[str] = None
    class_weights: Optional[tuple] = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    lr_schedule: str = "plateau"
    schedule_steps: Optional[tuple] = None
    ema_decay: float = 0.0
    flip_tta: bool = False
    grad_accum_steps: int = 1

    def __post_init__(self):
        if not hasattr(self.train, "lower"):  # a plain function: jitted here (a jitted one has .lower)
            object.__setattr__(self, "train", jax.jit(self.train, donate_argnums=0))
        if not hasattr(self.eval, "lower"):
            object.__setattr__(self, "eval", jax.jit(self.eval))

    @classmethod
    def build(cls, config, labels: Optional[PyTree] = None, *, train_labels=None,
              num_classes: Optional[int] = None, steps_per_epoch: Optional[int] = None) -> "Steps":
        """The steps ``config`` (a ``FitConfig``) asks for: its augmentation, preprocessing and class
        weights (``"balanced"``: from ``train_labels`` over ``num_classes`` classes, the training
        split's), its learning-rate schedule (``"cosine"``: over ``steps_per_epoch`` optimizer
        steps an epoch, ``len(train) // batch_size``), its evaluation (``flip_tta``), and ``labels``
        (a freeze label tree: build ``state.tx`` with ``adam(labels=labels)`` too)."""
        preprocess = get_preprocess(config.preprocess)
        augment_fn = None if config.augment is None else config.augment.fn()
        weights = None
        soft = {name: getattr(config, name) for name in SOFT_TARGETS}
        if any(soft.values()) and num_classes is None:
            raise ValueError(f"Steps.build: {', '.join(f'{k}={v}' for k, v in soft.items() if v)} needs num_classes= "
                             f"(the dataset's number of classes)")
        if config.class_weight == "balanced":
            if train_labels is None or num_classes is None:
                raise ValueError("Steps.build: class_weight='balanced' needs train_labels= and num_classes= (the "
                                 "training split's labels and its number of classes)")
            weights = balanced_class_weights(train_labels, num_classes)
        schedule = _schedule_steps(config, steps_per_epoch) if config.lr_schedule == "cosine" else None
        if config.lr_schedule == "cosine" and schedule is None:
            raise ValueError(f"Steps.build: lr_schedule='cosine' needs steps_per_epoch= (an int >= 1: the training "
                             f"split's examples // batch_size), got {steps_per_epoch!r}")
        k = config.grad_accum_steps
        if schedule is not None and not 0 <= schedule[1] < schedule[0]:
            raise ValueError(f"Steps.build: lr_schedule='cosine' with grad_accum_steps={k}: {config.epochs} epochs of "
                             f"{steps_per_epoch} steps make {schedule[0]} optimizer updates, {schedule[1]} of them "
                             f"warm-up ({config.warmup_epochs} epochs); need fewer warm-up updates than updates "
                             f"(fewer grad_accum_steps, or more epochs)")
        cosine = None if schedule is None else recipe.warmup_cosine(1.0, *schedule)
        return cls(train=make_train_step(labels=labels, augment_fn=augment_fn, preprocess=preprocess,
                                         class_weights=weights, num_classes=num_classes, **soft,
                                         lr_scale=None if cosine is None else _per_update(cosine, k),
                                         ema_decay=config.ema_decay),
                   eval=make_eval_step(preprocess=preprocess, flip_tta=config.flip_tta),
                   augment=config.augment,
                   preprocess=config.preprocess, labels=labels, class_weight=config.class_weight,
                   class_weights=None if weights is None else tuple(float(w) for w in weights), **soft,
                   lr_schedule=config.lr_schedule, schedule_steps=schedule, ema_decay=config.ema_decay,
                   flip_tta=config.flip_tta, grad_accum_steps=k)

    def check(self, config, *, steps_per_epoch: Optional[int] = None) -> None:
        """ValueError when these steps apply other settings than ``config`` records (with
        ``steps_per_epoch``, the cosine schedule's steps too)."""
        for name in ("augment", "preprocess", "class_weight", *SOFT_TARGETS, "lr_schedule", "ema_decay", "flip_tta",
                     "grad_accum_steps"):
            if getattr(self, name) != getattr(config, name):
                raise ValueError(f"fit: the steps apply {name}={getattr(self, name)!r} but the FitConfig says "
                                 f"{name}={getattr(config, name)!r}; build the steps from the config "
                                 f"(Steps.build(config)) so that config.json records what ran")
        want = _schedule_steps(config, steps_per_epoch) if config.lr_schedule == "cosine" else None
        if want is not None and self.schedule_steps != want:
            got = self.schedule_steps
            raise ValueError(f"fit: the steps' warm-up + cosine runs over {got[0]} steps with {got[1]} of warm-up, but "
                             f"the FitConfig's {config.epochs} epochs ({config.warmup_epochs} of warm-up) of "
                             f"{steps_per_epoch} steps make {want[0]} with {want[1]}; build the steps with "
                             f"Steps.build(config, steps_per_epoch={steps_per_epoch})")

    def lr_scale(self, step: int) -> float:
        """The factor of the optimizer's learning rate at train step ``step`` (0-based), as the train
        step computes it (float32): ``warmup_cosine(1.0, *schedule_steps)(step // grad_accum_steps)``,
        the update the step goes into; 1.0 with ``lr_schedule="plateau"``."""
        if self.schedule_steps is None:
            return 1.0
        cosine = recipe.warmup_cosine(1.0, *self.schedule_steps)
        return float(_per_update(cosine, self.grad_accum_steps)(jnp.asarray(step, jnp.int32)))


def _per_update(schedule: Callable, grad_accum_steps: int) -> Callable:
    """``schedule`` over optimizer updates as a function of the train step: ``s -> schedule(s // k)``
    (``schedule`` itself for ``k`` = 1). Between two updates the optimizer's updates are zeros, so
    only the scale of each update's last step acts."""
    if grad_accum_steps == 1:
        return schedule
    return lambda step: schedule(step // grad_accum_steps)


def _schedule_steps(config, steps_per_epoch) -> Optional[tuple]:
    """``(total_steps, warmup_steps)`` of ``config``'s cosine schedule, in optimizer updates (the
    train steps divided by ``config.grad_accum_steps``, rounded down: a last partial accumulation
    makes no update), or None when ``steps_per_epoch`` is not an int >= 1."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        return None
    k = config.grad_accum_steps
    return config.epochs * steps_per_epoch // k, config.warmup_epochs * steps_per_epoch // k


def balanced_class_weights(train_labels, num_classes: int):
    """float64 ``(K,)``: ``n / (K * n_c)`` for each class ``c`` with ``n_c`` of the ``n`` training
    labels (sklearn's and Keras' "balanced"; a class without examples gets weight 0)."""
    counts = np.bincount(np.asarray(train_labels, np.int64), minlength=num_classes).astype(np.float64)
    return np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)


def make_logits_fn(apply_fn: Callable, preprocess: Callable = scale_to_unit, flip_tta: bool = False) -> Callable:
    """``logits(variables, images) -> float32 (B, K)``, jitted, inference mode: the scores the
    end-of-run report is made from (on one device, from host copies of the weights).

    ``flip_tta``: the "logits" are ``log p``, ``p`` the mean of the softmaxes of each image and its
    left-right mirror (``jaxcnn.tta.flip_tta_log_probs``): their softmax is ``p``, so the test loss,
    accuracy and report score ``p``, and the temperature the report fits on them acts on ``log p``
    (``softmax(log p / T)``), as ``jaxcnn.inference``'s ``Restored.predict`` then applies it."""

    @jax.jit
    def logits(variables, images):
        def one_view(x):
            return apply_fn(variables, x, train=False).astype(jnp.float32)

        x = preprocess(images)
        return tta.flip_tta_log_probs(one_view, x) if flip_tta else one_view(x)

    return logits
