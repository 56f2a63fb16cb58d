"""Input preprocessing: uint8 images -> the float input a model was trained on.

Two modes, named in every run's ``config.json`` (``config["fit"]["preprocess"]``) so that inference applies
the run's own:

* ``"unit"`` — :func:`scale_to_unit`, ``x / 255`` (the seed's CIFAR CNN);
* ``"caffe"`` — :func:`caffe_preprocess`, Keras' ResNet50 mode (RGB -> BGR, minus the
  ImageNet means, no scaling).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

#: ImageNet channel means in **BGR** order, on the [0, 255] scale (Keras' values).
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def scale_to_unit(images) -> jax.Array:
    """uint8 ``(N, H, W, C)`` -> float32 in [0, 1] (the seed's ``x / 255``)."""
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def caffe_preprocess(images, dtype=jnp.float32) -> jax.Array:
    """What ``keras.applications.resnet50.preprocess_input`` does: RGB -> BGR, minus the mean.

    No scaling: pixel values stay on the [0, 255] scale.

    Args:
      images: RGB images, channels last: ``(N, H, W, 3)`` (or ``(H, W, 3)``), uint8 or float
        in [0, 255]. Not modified.
      dtype: floating output dtype (float32 by default).

    Returns:
      ``images[..., ::-1] - [103.939, 116.779, 123.68]`` as ``dtype``, same shape; jit-able.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(
            f"caffe_preprocess: images must be RGB channels-last (..., H, W, 3), got shape {tuple(images.shape)}"
        )
    if not (jnp.issubdtype(images.dtype, jnp.integer) or jnp.issubdtype(images.dtype, jnp.floating)):
        raise TypeError(f"caffe_preprocess: images must be uint8 or float, got {images.dtype}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"caffe_preprocess: dtype must be a float type, got {dtype}")
    x = jnp.asarray(images).astype(dtype)[..., ::-1]  # RGB -> BGR
    return x - jnp.asarray(IMAGENET_BGR_MEAN, dtype)


#: The preprocessing modes by the name a run records.
PREPROCESS: dict[str, Callable] = {"unit": scale_to_unit, "caffe": caffe_preprocess}


def get_preprocess(name: str) -> Callable:
    """The preprocessing function of mode ``name`` (``"unit"`` or ``"caffe"``)."""
    if name not in PREPROCESS:
        raise ValueError(f"preprocess={name!r}; allowed: {', '.join(map(repr, PREPROCESS))}")
    return PREPROCESS[name]
