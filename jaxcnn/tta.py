"""Horizontal-flip test-time augmentation: predict with the mean of the softmaxes of an image and its mirror.

One function, shared by training's evaluation (``jaxcnn.train.steps``: the validation of each epoch and
the end-of-run test scores and report, with ``FitConfig.flip_tta``) and by inference
(``jaxcnn.inference``: ``Restored.predict(..., tta=...)``), so that both compute the same scores. It is
``jaxcnn.train.recipe.flip_tta``'s mean taken over probabilities, returned as log-probabilities: the code
that scores logits (the cross-entropy, the argmax, the temperature ``softmax(z / T)``) takes them as
they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def flip_tta_log_probs(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
    """float32 ``(B, K)``: ``log((softmax(logits_fn(images)) + softmax(logits_fn(mirrored))) / 2)``.

    ``images``: float ``(B, H, W, C)`` (already preprocessed: preprocessing acts on each pixel, so it
    commutes with the mirror); ``mirrored`` is ``images[:, :, ::-1]``, each image mirrored left-right.
    ``logits_fn``: ``(B, H, W, C) -> (B, K)`` logits (the model in inference mode). Computed as the
    ``logaddexp`` of the two log-softmaxes minus ``log 2``: a class both views give a probability
    below float32's smallest keeps a finite log, as a single view's log-softmax does. Its softmax is
    the mean probability itself (the rows are normalised), its argmax the class of the highest mean
    probability, and ``-out[i, y]`` the cross-entropy of the mean probabilities for label ``y``.
    """
    a = jax.nn.log_softmax(logits_fn(images).astype(jnp.float32), axis=-1)  # (B, K)
    b = jax.nn.log_softmax(logits_fn(images[:, :, ::-1]).astype(jnp.float32), axis=-1)  # (B, K), W reversed
    return jnp.logaddexp(a, b) - jnp.float32(math.log(2.0))
