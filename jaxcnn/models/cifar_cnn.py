"""The seed's CIFAR-10 CNN (question 4) as a Flax Linen module over ``jaxcnn.layers``.

Three blocks of ``[Conv3×3-ReLU, BN, Conv3×3-ReLU, BN, MaxPool 2, Dropout 0.25]`` with
32 / 64 / 128 filters, then ``Flatten, Dense 128-ReLU, BN, Dropout 0.5, Dense 10``. The
last layer returns **logits**; apply ``jax.nn.softmax`` where probabilities are wanted.

Keras defaults are kept, so the model is the seed's model: convs ``padding="same"`` with
bias, Glorot-uniform kernels and zero biases, BatchNorm momentum 0.99 and epsilon 1e-3
(the shared bricks of :mod:`jaxcnn.models.bricks`; both BN settings are attributes).
With the default widths it has 551,722 trainable parameters and 1,152 non-trainable
ones (the BN moving means and variances, here ``batch_stats``), as ``model.summary()``
reports for the seed's Keras model (checked in ``tests/test_cifar_cnn.py``).

Parameter names (the filter plots use ``params["block1_conv1"]["kernel"]``, HWIO)::

    block{b}_conv{i}   (b = 1..3, i = 1, 2)   {"kernel": (3, 3, Cin, Cout), "bias": (Cout,)}
    block{b}_bn{i}                           {"scale", "bias"}; batch_stats {"mean", "var"}
    dense, dense_bn, logits
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn import layers
from jaxcnn.models.bricks import KERAS_BN_EPSILON, KERAS_BN_MOMENTUM, BatchNorm, Conv2D, glorot_uniform

CONV_DROPOUTS = ("dropout", "spatial", "dropblock", "none")


class CifarCNN(nn.Module):
    """The seed's CIFAR-10 CNN; input float images ``(N, H, W, 3)`` scaled to [0, 1], output logits.

    Attributes:
      num_classes: size of the output (default 10).
      widths: filters of the three conv blocks (default ``(32, 64, 128)``); any number of blocks.
      dense_units: width of the hidden dense layer (default 128).
      conv_dropout: what follows each block's max-pool: ``"dropout"`` (the seed's element-wise
        dropout), ``"spatial"`` (whole feature maps, :func:`jaxcnn.layers.spatial_dropout2d`),
        ``"dropblock"`` (:func:`jaxcnn.layers.dropblock`) or ``"none"``.
      conv_dropout_rate: probability of zeroing after each block (default 0.25).
      dense_dropout: probability of zeroing before the last layer (default 0.5).
      dropblock_size: DropBlock's block side (default 3; maps are 16, 8, 4 pixels wide).
      bn_momentum, bn_epsilon: every BatchNorm's settings (Keras' defaults 0.99 and 1e-3).
      dtype: the compute dtype (default float32; ``jnp.bfloat16`` for mixed precision). The
        parameters, the BatchNorm statistics (computed and kept in float32) and the returned
        logits stay float32 whatever it is.

    Call ``model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])``
    to train (BN uses batch statistics and updates ``batch_stats``) and
    ``model.apply(variables, x, train=False)`` for inference.
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    dense_units: int = 128
    conv_dropout: str = "dropout"
    conv_dropout_rate: float = 0.25
    dense_dropout: float = 0.5
    dropblock_size: int = 3
    bn_momentum: float = KERAS_BN_MOMENTUM
    bn_epsilon: float = KERAS_BN_EPSILON
    dtype: Any = jnp.float32

    def _check(self, x):
        if self.conv_dropout not in CONV_DROPOUTS:
            raise ValueError(f"CifarCNN: conv_dropout={self.conv_dropout!r}; allowed: {', '.join(CONV_DROPOUTS)}")
        for name in ("conv_dropout_rate", "dense_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"CifarCNN: {name}={rate!r}; must be a probability of zeroing in [0, 1)")
        if not self.widths or any(int(w) <= 0 for w in self.widths):
            raise ValueError(f"CifarCNN: widths={tuple(self.widths)!r}; must be positive ints")
        if x.ndim != 4:
            raise ValueError(f"CifarCNN: x must be (N, H, W, C), got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"CifarCNN: x must be float images scaled to [0, 1], got dtype {x.dtype}")

    def _drop_conv(self, x, train):
        rate = float(self.conv_dropout_rate)
        if self.conv_dropout == "none" or not train or rate == 0.0:
            return x
        key = self.make_rng("dropout")
        if self.conv_dropout == "dropout":
            return layers.dropout(x, rate, key=key, train=True)
        if self.conv_dropout == "spatial":
            return layers.spatial_dropout2d(x, rate, key=key, train=True)
        return layers.dropblock(x, rate, block_size=self.dropblock_size, key=key, train=True)

    @nn.compact
    def __call__(self, x, *, train: bool):
        """``x``: float ``(N, H, W, C)`` in [0, 1]; ``train``: dropout on, BN batch statistics.

        Returns logits ``(N, num_classes)``.
        """
        self._check(x)

        def bn(name):
            return BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, name=name)

        x = x.astype(self.dtype)
        for b, width in enumerate(self.widths, start=1):
            for i in (1, 2):
                conv = Conv2D(int(width), 3, padding="SAME", dtype=self.dtype, name=f"block{b}_conv{i}")
                x = nn.relu(conv(x))  # (N, H, W, width)
                x = bn(f"block{b}_bn{i}")(x)
            x = layers.max_pool2d(x, 2)  # (N, H/2, W/2, width)
            x = self._drop_conv(x, train)
        x = x.reshape((x.shape[0], -1))  # (N, H·W·C), NHWC order as Keras' Flatten
        x = nn.relu(nn.Dense(self.dense_units, kernel_init=glorot_uniform, dtype=self.dtype, name="dense")(x))
        x = bn("dense_bn")(x)
        key = self.make_rng("dropout") if train and self.dense_dropout > 0 else None
        x = layers.dropout(x, float(self.dense_dropout), key=key, train=train)
        x = nn.Dense(self.num_classes, kernel_init=glorot_uniform, dtype=self.dtype, name="logits")(x)
        return x.astype(jnp.float32)  # (N, num_classes)


def count_params(variables) -> tuple[int, int]:
    """``(trainable, non_trainable)`` = sizes of ``variables["params"]`` and ``variables["batch_stats"]``,
    the two numbers Keras' ``model.summary()`` reports."""
    size = lambda tree: sum(int(a.size) for a in jax.tree.leaves(tree))  # noqa: E731
    return size(variables.get("params", {})), size(variables.get("batch_stats", {}))
