"""The training recipe's ingredients beyond the seed's, as pure functions (jit-able, explicit keys).

Each is what the tools users come from give them, written over optax where optax has it:

* label smoothing: ``smoothed_targets`` (``optax.smooth_labels``: ``(1 - s) * one_hot + s / K``);
* mixup and cutmix (Zhang et al. 2018; Yun et al. 2019): ``mixup``, ``cutmix``, ``mix_batch``
  (timm's batch mode: each image is mixed with the batch's reversed order, one ``lam`` a batch);
* the loss on soft targets: ``soft_cross_entropy`` (``optax.softmax_cross_entropy``);
* warm-up + cosine: ``warmup_cosine`` (``optax.warmup_cosine_decay_schedule`` from 0);
* a weight EMA: ``ema_update`` (``optax.incremental_update``);
* AdamW's usual exclusions: ``weight_decay_mask`` (no decay of biases or BatchNorm's scale / bias);
* flip test-time augmentation: ``flip_tta`` (the mean of the predictions of an image and its mirror);
* the LR finder's suggestion: ``suggest_learning_rate`` on a swept curve of (learning rate, loss).

Shapes: images float ``(B, H, W, C)``, integer labels ``(B,)``, targets float ``(B, K)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def smoothed_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """float32 ``(B, K)``: ``(1 - smoothing) * one_hot(labels) + smoothing / K`` (``smoothing`` in
    ``[0, 1)``; 0: the one-hot targets)."""
    if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
        raise ValueError(f"smoothed_targets: smoothing={smoothing!r}; must be a number in [0, 1)")
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 ``(B,)``: ``-sum_k targets[b, k] * log_softmax(logits)[b, k]``."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _check_alpha(name: str, alpha) -> None:
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{name}: alpha={alpha!r}; must be a finite number > 0 (lam ~ Beta(alpha, alpha))")


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Mixup: ``lam ~ Beta(alpha, alpha)``; each image and target becomes ``lam`` of itself plus
    ``1 - lam`` of the batch's reversed order (``x[::-1]``). Returns ``(images, targets)``."""
    _check_alpha("mixup", alpha)
    lam = jax.random.beta(key, alpha, alpha).astype(images.dtype)
    mixed = lam * images + (1 - lam) * images[::-1]
    return mixed, lam.astype(targets.dtype) * targets + (1 - lam.astype(targets.dtype)) * targets[::-1]


def cutmix_box(key: jax.Array, height: int, width: int, alpha: float) -> jax.Array:
    """bool ``(H, W)``: cutmix's box (True inside), of area ``(1 - lam) H W`` before clipping at the
    edges, ``lam ~ Beta(alpha, alpha)``, centred at a uniform pixel."""
    _check_alpha("cutmix", alpha)
    k_lam, k_y, k_x = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    ratio = jnp.sqrt(1.0 - lam)
    half_h, half_w = jnp.floor(height * ratio) / 2, jnp.floor(width * ratio) / 2
    cy = jax.random.randint(k_y, (), 0, height).astype(jnp.float32)
    cx = jax.random.randint(k_x, (), 0, width).astype(jnp.float32)
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    return (rows >= jnp.floor(y0)) & (rows < jnp.floor(y1)) & (cols >= jnp.floor(x0)) & (cols < jnp.floor(x1))


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Cutmix: a box (``cutmix_box``) of each image is replaced by the same box of the batch's
    reversed order; the targets are mixed by the areas actually kept (``lam = 1 - box / (H W)``)."""
    box = cutmix_box(key, images.shape[1], images.shape[2], alpha)
    mixed = jnp.where(box[None, :, :, None], images[::-1], images)
    lam = 1.0 - box.mean(dtype=jnp.float32)
    return mixed, lam * targets + (1 - lam) * targets[::-1]


def mix_batch(key: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Mixup, cutmix, or (both alphas > 0) one of them picked with probability 1/2 each batch, as
    timm's ``Mixup`` does; both 0: the batch as it is."""
    if mixup_alpha and cutmix_alpha:
        k_which, k_mix = jax.random.split(key)
        use_cutmix = jax.random.bernoulli(k_which)
        a = mixup(k_mix, images, targets, mixup_alpha)
        b = cutmix(k_mix, images, targets, cutmix_alpha)
        return jnp.where(use_cutmix, b[0], a[0]), jnp.where(use_cutmix, b[1], a[1])
    if mixup_alpha:
        return mixup(key, images, targets, mixup_alpha)
    if cutmix_alpha:
        return cutmix(key, images, targets, cutmix_alpha)
    return images, targets


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    """The learning rate at step ``t``: ``peak_lr * t / warmup_steps`` up to ``warmup_steps``, then
    ``end_lr + (peak_lr - end_lr) * (1 + cos(pi * (t - w) / (total - w))) / 2`` down to ``end_lr`` at
    ``total_steps`` (and after)."""
    if not (isinstance(total_steps, int) and isinstance(warmup_steps, int) and 0 <= warmup_steps < total_steps):
        raise ValueError(f"warmup_cosine: warmup_steps={warmup_steps!r}, total_steps={total_steps!r}; need "
                         f"0 <= warmup_steps < total_steps (ints)")
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_lr)


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
    """One step of an exponential moving average: ``decay * ema + (1 - decay) * new``, leaf by leaf."""
    return optax.incremental_update(new, ema, 1.0 - decay)


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for the leaves AdamW decays: kernels (2 or more dimensions); False for biases and
    BatchNorm's scale / bias (1-D) and scalars: the usual exclusions (timm, Keras' ``exclude_from_weight_decay``)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def flip_tta(predict: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``images (B, H, W, C) -> (predict(images) + predict(images mirrored left-right)) / 2``."""
    return lambda images: (predict(images) + predict(images[:, :, ::-1])) / 2


def suggest_learning_rate(lrs, losses, *, window: int = 0) -> tuple[float, str]:
    """The LR finder's suggestion on a sweep of increasing learning rates: ``(lr, why)``.

    The losses are smoothed by a centred moving average (``window`` points, default ``n // 20``
    and at least 5: no lag, unlike a running EMA), cut where they first exceed 4x their
    minimum (the sweep diverged), and the suggestion is the learning rate where the smoothed
    loss falls fastest against ``log(lr)``, strictly before its minimum (Smith 2017; fastai's "steep").
    """
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    if lrs.ndim != 1 or lrs.shape != losses.shape or len(lrs) < 10:
        raise ValueError(f"suggest_learning_rate: lrs and losses must be 1-D of the same length >= 10, got "
                         f"{lrs.shape} and {losses.shape}")
    if not (np.all(lrs > 0) and np.all(np.diff(lrs) > 0)):
        raise ValueError("suggest_learning_rate: lrs must be positive and increasing")
    finite = np.isfinite(losses)
    n = int(np.argmin(finite)) if not finite.all() else len(losses)  # up to the first loss that is not finite
    lrs, losses = lrs[:n], losses[:n]
    w = window or max(5, len(losses) // 20)
    w = min(w, len(losses)) | 1  # odd: centred
    pad = np.pad(losses, w // 2, mode="edge")
    smooth = np.convolve(pad, np.ones(w) / w, mode="valid")
    above = np.nonzero(smooth > 4 * smooth.min())[0]
    end = int(above[above > np.argmin(smooth)][0]) if (above > np.argmin(smooth)).any() else len(smooth)
    smooth, lrs = smooth[:end], lrs[:end]
    lowest = int(np.argmin(smooth))
    if lowest < 2:
        raise ValueError("suggest_learning_rate: the loss did not fall over the sweep; start it at a smaller "
                         "learning rate")
    slope = np.gradient(smooth[:lowest + 1], np.log(lrs[:lowest + 1]))
    i = int(np.argmin(slope[:lowest]))  # before the lowest point: there the loss has stopped falling
    why = (f"the loss falls fastest at lr {lrs[i]:.2g} (smoothed over {w} steps); it is lowest at "
           f"{lrs[lowest]:.2g}")
    return float(lrs[i]), why
