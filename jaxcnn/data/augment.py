"""On-device augmentation: the seed's ImageDataGenerator as pure, jit-able JAX.

The seed trains its CIFAR-10 CNN with Keras' ``ImageDataGenerator(rotation_range=15,
width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)``. Here the same
transform is one vectorised gather per batch:

* :func:`affine_transform` is the deterministic piece: per example, rotate about the
  image centre, shift, then mirror; sample the source pixel (nearest neighbour, or
  bilinear as Keras' default ``interpolation_order=1``); outside the image use the
  nearest edge pixel (Keras ``fill_mode="nearest"``).
* :func:`random_augment` draws the per-example parameters from a key and calls it.
* :class:`AugmentConfig` holds the ranges (a training config's one home for them) and
  gives ``augment_fn(key, images)`` for a train step.

Conventions (pixel grid with row 0 at the top, as images are displayed):

* ``angle_deg > 0`` turns the content **counter-clockwise** about the centre
  ``((H - 1) / 2, (W - 1) / 2)``; ``angle_deg=90`` on a square image equals
  ``np.rot90(images, k=1, axes=(1, 2))``.
* ``shift_x > 0`` moves the content right, ``shift_y > 0`` moves it down (pixels;
  fractional shifts are sampled like any other coordinate).
* ``flip`` mirrors left-right, after the rotation and the shift.

Randomness comes only from ``key``; the same key gives the same batch.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

INTERPOLATIONS = ("nearest", "bilinear")


def affine_transform(images, angle_deg, shift_x, shift_y, flip, *, interpolation="nearest"):
    """Rotates, shifts and mirrors each image of a batch; edge pixels fill the outside.

    Args:
      images: float array ``(N, H, W, C)`` (float32, bfloat16, ...), NHWC.
      angle_deg: ``(N,)`` or scalar, rotation in degrees, counter-clockwise as displayed.
      shift_x: ``(N,)`` or scalar, shift in pixels, > 0 moves the content right.
      shift_y: ``(N,)`` or scalar, shift in pixels, > 0 moves the content down.
      flip: ``(N,)`` or scalar bool, mirror left-right (applied last).
      interpolation: ``"nearest"`` (default: every output value is an input value) or
        ``"bilinear"`` (Keras ImageDataGenerator's default, ``interpolation_order=1``).

    Returns:
      ``(N, H, W, C)`` array of ``images.dtype``. Values stay within the input's
      range: nearest copies input values, bilinear takes convex combinations.
      A zero transform returns the input exactly.
    """
    _check_images("affine_transform", images)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"affine_transform: interpolation={interpolation!r}; allowed: {', '.join(INTERPOLATIONS)}")
    n, h, w, _ = images.shape
    params = {}
    for arg, value in (("angle_deg", angle_deg), ("shift_x", shift_x), ("shift_y", shift_y), ("flip", flip)):
        value = jnp.asarray(value)
        if value.shape not in ((), (n,)):
            raise ValueError(
                f"affine_transform: {arg} has shape {value.shape}; must be a scalar or ({n},) "
                "(one value per image)")
        params[arg] = jnp.broadcast_to(value, (n,))
    theta = jnp.deg2rad(params["angle_deg"].astype(jnp.float32))[:, None, None]   # (N, 1, 1)
    sx = params["shift_x"].astype(jnp.float32)[:, None, None]
    sy = params["shift_y"].astype(jnp.float32)[:, None, None]
    flip = params["flip"].astype(bool)[:, None, None]

    # Output pixel coordinates, (1, H, W); invert flip, then shift, then rotation.
    yo = jnp.arange(h, dtype=jnp.float32)[None, :, None]
    xo = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    x1 = jnp.where(flip, (w - 1) - xo, xo)                                  # (N, 1, W)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dx, dy = x1 - sx - cx, yo - sy - cy                                     # (N, H, W) after broadcast
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Forward rotation maps (dx, dy) to (dx cos + dy sin, -dx sin + dy cos); this is its inverse.
    src_x = cos * dx - sin * dy + cx                                        # (N, H, W)
    src_y = sin * dx + cos * dy + cy

    if interpolation == "nearest":
        return _gather(images, jnp.round(src_y), jnp.round(src_x))
    # Bilinear over the four neighbours; clamping the neighbours is Keras' "nearest" fill.
    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]               # (N, H, W, 1)
    top = _gather(images, y0, x0, jnp.float32) * (1 - wx) + _gather(images, y0, x0 + 1, jnp.float32) * wx
    bot = _gather(images, y0 + 1, x0, jnp.float32) * (1 - wx) + _gather(images, y0 + 1, x0 + 1, jnp.float32) * wx
    out = top * (1 - wy) + bot * wy
    # Float rounding may step a hair outside [min, max] of the neighbours: keep the range.
    return jnp.clip(out, images.min(), images.max()).astype(images.dtype)


def random_augment(key, images, *, rotation=15.0, width_shift=0.1, height_shift=0.1,
                   horizontal_flip=True, interpolation="nearest"):
    """Random rotation, shift and left-right flip per example, as Keras ImageDataGenerator.

    Per image, independently: an angle uniform in ``[-rotation, rotation]`` degrees, shifts
    uniform in ``[-width_shift, width_shift] * W`` and ``[-height_shift, height_shift] * H``
    pixels (continuous, as Keras), a mirror with probability 0.5 if ``horizontal_flip``.
    Pixels from outside the image take the nearest edge pixel (``fill_mode="nearest"``).

    Args:
      key: a ``jax.random`` key; the only source of randomness.
      images: float array ``(N, H, W, C)`` (float32 or bfloat16), NHWC.
      rotation: maximum angle in degrees, >= 0 (default 15, the seed's ``rotation_range``).
      width_shift, height_shift: maximum shifts as fractions of W / H, in ``[0, 1)``
        (default 0.1).
      horizontal_flip: mirror half of the images (default True).
      interpolation: ``"nearest"`` (default) or ``"bilinear"`` (Keras' own default).

    Returns:
      Augmented images ``(N, H, W, C)``, same dtype, within the input's value range.
    """
    _check_images("random_augment", images)
    _check_ranges("random_augment", rotation, width_shift, height_shift, horizontal_flip)
    n, h, w, _ = images.shape
    k_angle, k_x, k_y, k_flip = jax.random.split(key, 4)
    angle = jax.random.uniform(k_angle, (n,), jnp.float32, -rotation, rotation)
    shift_x = jax.random.uniform(k_x, (n,), jnp.float32, -width_shift, width_shift) * w
    shift_y = jax.random.uniform(k_y, (n,), jnp.float32, -height_shift, height_shift) * h
    flip = jax.random.bernoulli(k_flip, 0.5, (n,)) & horizontal_flip
    return affine_transform(images, angle, shift_x, shift_y, flip, interpolation=interpolation)


def _check_ranges(fn, rotation, width_shift, height_shift, horizontal_flip):
    if not isinstance(rotation, numbers.Real) or isinstance(rotation, bool) \
            or not np.isfinite(rotation) or rotation < 0:
        raise ValueError(f"{fn}: rotation={rotation!r}; must be a finite number of degrees >= 0")
    for arg, value in (("width_shift", width_shift), ("height_shift", height_shift)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{fn}: {arg}={value!r}; must be a fraction in [0, 1)")
    if not isinstance(horizontal_flip, (bool, np.bool_)):
        raise TypeError(f"{fn}: horizontal_flip={horizontal_flip!r}; must be a bool")


def _check_images(fn, images):
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"{fn}: images must be an array (N, H, W, C), got {type(images).__name__}")
    if len(images.shape) != 4:
        raise ValueError(f"{fn}: images must have rank 4 (N, H, W, C), got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: images must be floating point (float32, bfloat16, ...), got dtype {images.dtype}; "
            "convert uint8 images first, e.g. images.astype(jnp.float32) / 255")


def _gather(images, iy, ix, dtype=None):
    """``images[n, clamp(iy), clamp(ix), :]`` for index maps ``(N, H', W')`` -> ``(N, H', W', C)``."""
    n, h, w, c = images.shape
    iy = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    flat = images.reshape(n, h * w, c)                                      # (N, H*W, C)
    idx = (iy * w + ix).reshape(n, -1, 1)                                   # (N, H'*W', 1)
    out = jnp.take_along_axis(flat, idx, axis=1).reshape(n, *iy.shape[1:], c)
    return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The ranges of :func:`random_augment`, validated when built; defaults are the seed's.

    ``AugmentConfig().fn()`` is ``augment_fn(key, images) -> images`` for
    ``jaxcnn.train.make_train_step``. A training config holds one of these, or None for no
    augmentation.
    """

    rotation: float = 15.0
    width_shift: float = 0.1
    height_shift: float = 0.1
    horizontal_flip: bool = True
    interpolation: str = "nearest"

    def __post_init__(self):
        _check_ranges("AugmentConfig", self.rotation, self.width_shift, self.height_shift, self.horizontal_flip)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"AugmentConfig: interpolation={self.interpolation!r}; allowed: "
                             f"{', '.join(INTERPOLATIONS)}")

    def fn(self) -> Callable:
        """``random_augment`` with these ranges: ``fn(key, images (N, H, W, C) float) -> images``."""
        return functools.partial(random_augment, **dataclasses.asdict(self))
