"""The two Keras-compatible bricks every model here is built from: a conv layer and BatchNorm.

Both keep Keras' defaults, so a model written with them is the Keras model with the same
weights (checked against Keras in ``tests/test_cifar_cnn.py`` and ``tests/test_resnet_port.py``):

* :class:`Conv2D` — ``jaxcnn.layers.conv2d`` with a Glorot-uniform HWIO kernel and an
  optional zero-initialised bias (Keras' ``Conv2D`` initialisers);
* :class:`BatchNorm` — ``flax.linen.BatchNorm`` with Keras' ``momentum=0.99`` and
  ``epsilon=1e-3`` (Flax's own default epsilon is 1e-5). Flax's momentum means what Keras'
  does: ``moving = momentum * moving + (1 - momentum) * batch``;
* :class:`ReLU` — a weightless named ReLU (Keras' ``Activation("relu")`` layer), so an output
  that is no other layer's is still a submodule's (``jaxcnn.explain`` reads feature maps there).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn import layers

#: Keras' ``BatchNormalization`` defaults.
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3



def glorot_uniform(key, shape, dtype=jnp.float32):
    """Keras' default kernel initializer, bitwise ``flax.linen.initializers.glorot_uniform()``:
    uniform in ``±sqrt(6 / (fan_in + fan_out))``, with the receptive field (the kernel's
    spatial size) in both fans.

    Drawn flat and reshaped: the same values (threefry's counters run over the flat index),
    but XLA's CPU compiles a flat draw several times faster than a 4-D one, which is most of a
    small model's init time (measured in ``benchmarks/README.md``).
    """
    receptive_field = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
    variance = jnp.array(1.0 / ((fan_in + fan_out) / 2), dtype=dtype)
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -1) * jnp.sqrt(3 * variance)
    return flat.reshape(shape)


class Conv2D(nn.Module):
    """Keras-style conv layer over ``jaxcnn.layers.conv2d``.

    Input ``(N, H, W, C_in)`` -> ``(N, H', W', features)``; parameters ``kernel``
    ``(k, k, C_in, features)`` (HWIO) and, with ``use_bias``, ``bias`` ``(features,)``.

    Attributes:
      features: output channels.
      kernel_size: the square kernel's side ``k``.
      strides: stride in both spatial dimensions.
      padding: as ``jaxcnn.layers.conv2d``: ``"SAME"``, ``"VALID"`` or explicit zero padding.
      use_bias: add a bias (Keras' default, True).
      dtype: compute dtype; ``param_dtype``: the parameters' dtype (float32).
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = "VALID"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        w = self.param("kernel", glorot_uniform, (k, k, x.shape[-1], self.features), self.param_dtype)  # HWIO
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return layers.conv2d(x.astype(self.dtype), w.astype(self.dtype), None if b is None else b.astype(self.dtype),
                             stride=self.strides, padding=self.padding)  # (N, H', W', features)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with Keras' defaults: ``momentum=0.99``, ``epsilon=1e-3``.

    Parameters ``scale`` / ``bias`` (Keras' gamma / beta); ``batch_stats`` ``mean`` / ``var``
    (Keras' moving mean / variance). ``use_running_average=True`` is Keras' inference mode.
    """

    momentum: float = KERAS_BN_MOMENTUM
    epsilon: float = KERAS_BN_EPSILON


class ReLU(nn.Module):
    """``max(x, 0)`` as a named layer without weights (Keras' ``Activation("relu")``): it adds
    nothing to ``params``, and its output can be intercepted by name (``nn.intercept_methods``)."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(x)
