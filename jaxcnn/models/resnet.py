"""ResNet50 v1 as Keras builds it (``keras.applications.ResNet50``), in Flax Linen.

This is the Keras v1 model, not Flax's own ImageNet ResNet50 (which is v1.5): a
zero-pad 3 + 7×7/2 conv **with bias**, BN (epsilon 1.001e-5), zero-pad 1 + 3×3/2 max
pool, then bottleneck blocks whose stride sits on the **first 1×1 conv**, every conv with a
bias, and a conv+BN shortcut in the first block of each stage.

Parameters carry the Keras layer names, flat, one Flax submodule per Keras layer::

    params["conv1_conv"]            = {"kernel": (7, 7, 3, 64) HWIO, "bias": (64,)}
    params["conv4_block2_3_bn"]     = {"scale": (1024,), "bias": (1024,)}
    batch_stats["conv4_block2_3_bn"] = {"mean": (1024,), "var": (1024,)}
    params["predictions"]           = {"kernel": (2048, 1000), "bias": (1000,)}

so a Keras freeze rule (``base_model.layers[:100]``) means the same thing here
(``jaxcnn.freeze.first_n_keras_layers(100, KERAS_LAYER_ORDER)``) and
``jaxcnn.weights.keras_h5.load_keras_h5`` fills the tree straight from Keras' HDF5 file.

Inputs are ``caffe``-preprocessed float images, NHWC (``jaxcnn.preprocess.caffe_preprocess``).
Verified against Keras (JAX backend, random weights) to 1e-4 relative in
``tests/test_resnet_port.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn import layers
from jaxcnn.models.bricks import KERAS_BN_MOMENTUM, BatchNorm, Conv2D, ReLU, glorot_uniform

#: Keras applications' ResNet BatchNorm epsilon (not Keras' 1e-3 default).
RESNET_BN_EPSILON = 1.001e-5


def keras_layer_order(
    stage_sizes: Sequence[int] = (3, 4, 6, 3),
    *,
    include_top: bool = True,
    pooling: Optional[str] = None,
) -> tuple[str, ...]:
    """Keras layer names of a v1 ResNet in ``model.layers`` order (weightless layers included).

    The order is Keras' own (checked against ``keras.applications.ResNet50`` in the tests):
    in a stage's first block Keras lists ``_1_conv .. _2_relu`` before the shortcut
    ``_0_conv``, then ``_3_conv, _0_bn, _3_bn``. ``ResNet50(include_top=False)`` gives 175
    names; ``include_top=True`` adds ``avg_pool`` and ``predictions`` (177).
    """
    names = ["input_layer", "conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "pool1_pad", "pool1_pool"]
    for s, blocks in enumerate(stage_sizes):
        for b in range(blocks):
            p = f"conv{s + 2}_block{b + 1}"
            names += [f"{p}_1_conv", f"{p}_1_bn", f"{p}_1_relu", f"{p}_2_conv", f"{p}_2_bn", f"{p}_2_relu"]
            if b == 0:
                names += [f"{p}_0_conv", f"{p}_3_conv", f"{p}_0_bn", f"{p}_3_bn"]
            else:
                names += [f"{p}_3_conv", f"{p}_3_bn"]
            names += [f"{p}_add", f"{p}_out"]
    if include_top:
        names += ["avg_pool", "predictions"]
    elif pooling == "avg":
        names += ["avg_pool"]
    elif pooling == "max":
        names += ["max_pool"]
    return tuple(names)


#: ``keras.applications.ResNet50(include_top=True).layers`` names, in order (177).
#: ``[:175]`` is the ``include_top=False`` model.
KERAS_LAYER_ORDER: tuple[str, ...] = keras_layer_order()


class ResNet(nn.Module):
    """Generic Keras-v1 ResNet with bottleneck blocks; ``ResNet50`` fixes the sizes.

    Attributes:
      stage_sizes: blocks per stage (ResNet50: ``(3, 4, 6, 3)``).
      filters: bottleneck widths per stage (ResNet50: ``(64, 128, 256, 512)``; a block
        outputs ``4 * filters``).
      stem_filters: width of ``conv1_conv`` (64).
      include_top: end with global average pooling and the ``predictions`` dense layer.
      pooling: without the top, ``None`` (return the last feature map), ``"avg"`` or ``"max"``.
      classes: width of ``predictions``.
      classifier_activation: ``"softmax"`` (Keras' default: outputs are probabilities) or
        ``None`` (logits, what a loss function wants).
      dtype: compute dtype; parameters stay float32.
      bn_momentum, bn_epsilon: every BatchNorm's settings (Keras' 0.99 and 1.001e-5).
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    filters: Sequence[int] = (64, 128, 256, 512)
    stem_filters: int = 64
    include_top: bool = True
    pooling: Optional[str] = None
    classes: int = 1000
    classifier_activation: Optional[str] = "softmax"
    dtype: Any = jnp.float32
    bn_momentum: float = KERAS_BN_MOMENTUM
    bn_epsilon: float = RESNET_BN_EPSILON

    def layer_order(self) -> tuple[str, ...]:
        """This model's Keras layer names in ``model.layers`` order."""
        return keras_layer_order(self.stage_sizes, include_top=self.include_top, pooling=self.pooling)

    def _check(self, x, frozen_bn):
        if self.pooling not in (None, "avg", "max"):
            raise ValueError(f"ResNet: pooling={self.pooling!r}; allowed: None, 'avg', 'max'")
        if self.classifier_activation not in (None, "softmax"):
            raise ValueError(
                f"ResNet: classifier_activation={self.classifier_activation!r}; allowed: 'softmax', None"
            )
        if len(self.stage_sizes) != len(self.filters):
            raise ValueError(f"ResNet: stage_sizes {tuple(self.stage_sizes)} and filters {tuple(self.filters)} differ in length")
        if getattr(x, "ndim", None) != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"ResNet: x must be a float (N, H, W, C) array (caffe-preprocessed), got "
                f"{getattr(x, 'dtype', type(x))} of shape {getattr(x, 'shape', None)}"
            )
        if not isinstance(frozen_bn, (frozenset, set, tuple, list)):
            raise TypeError(f"ResNet: frozen_bn must be a set of layer names, got {type(frozen_bn).__name__}")
        unknown = set(frozen_bn) - set(self.layer_order())
        if unknown:
            raise ValueError(f"ResNet: frozen_bn names not in this model: {sorted(unknown)[:10]}")

    @nn.compact
    def __call__(self, x, *, train: bool, frozen_bn: frozenset = frozenset()):
        """Forward pass.

        Args:
          x: ``(N, H, W, 3)`` float, caffe-preprocessed (BGR, mean-subtracted), H, W >= 32.
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
            ``mutable=["batch_stats"]``); ``False`` uses the running statistics.
          frozen_bn: layer names whose BatchNorm runs in inference mode even when
            ``train=True`` (Keras ``layer.trainable = False``); see
            ``jaxcnn.freeze.frozen_layer_names``. Names of other layers are ignored.

        Returns:
          ``(N, classes)`` with the top; without it ``(N, h, w, 4 * filters[-1])`` for
          ``pooling=None`` or ``(N, 4 * filters[-1])`` for ``"avg"`` / ``"max"``.
        """
        if not isinstance(train, bool):
            raise TypeError(f"ResNet: train must be a Python bool, got {train!r}")
        self._check(x, frozen_bn)

        conv = functools.partial(Conv2D, dtype=self.dtype)

        def bn(y, name):
            return BatchNorm(use_running_average=(not train) or name in frozen_bn, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype, name=name)(y)

        x = x.astype(self.dtype)
        x = conv(self.stem_filters, 7, strides=2, padding=((3, 3), (3, 3)), name="conv1_conv")(x)  # conv1_pad + VALID
        x = nn.relu(bn(x, "conv1_bn"))  # (N, H/2, W/2, 64)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # pool1_pad: Keras pads zeros, not -inf
        x = layers.max_pool2d(x, 3, stride=2, padding="VALID")  # pool1_pool: (N, H/4, W/4, 64)

        for s, (blocks, f) in enumerate(zip(self.stage_sizes, self.filters)):
            for b in range(blocks):
                p = f"conv{s + 2}_block{b + 1}"
                stride = 2 if (b == 0 and s > 0) else 1  # Keras v1: stride on the first 1×1 conv
                if b == 0:
                    shortcut = bn(conv(4 * f, 1, strides=stride, name=f"{p}_0_conv")(x), f"{p}_0_bn")
                else:
                    shortcut = x
                y = nn.relu(bn(conv(f, 1, strides=stride, name=f"{p}_1_conv")(x), f"{p}_1_bn"))
                y = nn.relu(bn(conv(f, 3, padding="SAME", name=f"{p}_2_conv")(y), f"{p}_2_bn"))
                y = bn(conv(4 * f, 1, name=f"{p}_3_conv")(y), f"{p}_3_bn")
                x = ReLU(name=f"{p}_out")(shortcut + y)  # {p}_add, {p}_out: the block's output, a named layer

        if self.include_top:
            x = layers.global_avg_pool2d(x)  # (N, 2048)
            x = nn.Dense(self.classes, kernel_init=glorot_uniform, dtype=self.dtype, name="predictions")(x)
            if self.classifier_activation == "softmax":
                x = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
        elif self.pooling == "avg":
            x = layers.global_avg_pool2d(x)
        elif self.pooling == "max":
            x = layers.global_max_pool2d(x)
        return x


#: ``keras.applications.ResNet50``: ``ResNet50(include_top=True, pooling=None, classes=1000)``.
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), filters=(64, 128, 256, 512), stem_filters=64)

#: A tiny variant with the same layer names and structure, for fast tests (Keras builds the
#: same model with `keras.src.applications.resnet.ResNet`, whose stem is fixed at 64).
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), filters=(4, 4, 8, 8), stem_filters=64, classes=10)
#: ResNet50's layer names with one bottleneck block per stage and a quarter of its widths (0.51 M
#: parameters without the top): a backbone that trains on a CPU in minutes (``finetune --preset quick``).
ResNetSmall = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), filters=(16, 32, 64, 128), stem_filters=16)


class Classifier(nn.Module):
    """A pretrained backbone plus a new dense head: the fine-tuning model.

    ``params`` is ``{"backbone": <Keras-named layers>, "head": {"kernel", "bias"}}`` (plus
    ``"head_hidden"`` with ``hidden``) so ``jaxcnn.freeze.backbone()`` freezes the whole
    backbone and ``first_n_keras_layers(n, model.backbone.layer_order())`` still means ``base_model.layers[:n]``. Fill the
    backbone from ``load_keras_h5(path, include_top=False)`` (see ``with_backbone_variables``).

    With ``hidden=256, dropout_rate=0.5`` this is the seed's Keras head::

        GlobalAveragePooling2D -> Dense(256, relu) -> Dropout(0.5) -> Dense(N)
        (backbone pooling="avg")   "head_hidden"                      "head" (logits)

    Attributes:
      backbone: e.g. ``ResNet50(include_top=False, pooling="avg")`` (must return ``(N, F)``).
      num_classes: width of the head (logits, no softmax).
      dropout_rate: probability of zeroing a unit before the ``head`` layer (0 = none); needs
        a ``"dropout"`` rng when ``train=True``.
      hidden: width of a ReLU dense layer ``"head_hidden"`` between the features and the
        dropout, or ``None`` (default: features -> dropout -> ``head``).
    """

    backbone: nn.Module
    num_classes: int
    dropout_rate: float = 0.0
    hidden: Optional[int] = None

    @nn.compact
    def __call__(self, x, *, train: bool, frozen_bn: frozenset = frozenset()):
        """``x`` ``(N, H, W, 3)`` caffe-preprocessed -> logits ``(N, num_classes)``.

        ``frozen_bn``: backbone layer names whose BN runs in inference mode
        (``jaxcnn.freeze.frozen_layer_names(labels, under="backbone")``).
        """
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"Classifier: dropout_rate={self.dropout_rate!r}; allowed: 0 <= rate < 1")
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int)
                                        or self.hidden < 1):
            raise ValueError(f"Classifier: hidden={self.hidden!r}; allowed: None or an int >= 1")
        feats = self.backbone(x, train=train, frozen_bn=frozen_bn)
        if feats.ndim != 2:
            raise ValueError(f"Classifier: backbone must return (N, F) features (use pooling='avg'), got {feats.shape}")
        if self.hidden is not None:
            feats = nn.relu(nn.Dense(self.hidden, kernel_init=glorot_uniform, dtype=feats.dtype, name="head_hidden")(feats))
        if self.dropout_rate > 0.0:
            key = self.make_rng("dropout") if train else None
            feats = layers.dropout(feats, self.dropout_rate, key=key, train=train)
        return nn.Dense(self.num_classes, kernel_init=glorot_uniform, dtype=feats.dtype, name="head")(feats)


def with_backbone_variables(variables: dict, backbone_variables: dict, name: str = "backbone") -> dict:
    """Return ``variables`` (of a ``Classifier``) with the backbone part replaced by
    ``backbone_variables`` (e.g. converted ImageNet weights); raises if any shape differs."""
    out = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in backbone_variables.items():
        if col not in out or name not in out[col]:
            raise ValueError(f"with_backbone_variables: variables have no {col}[{name!r}]")
        want = jax.tree.map(lambda a: (a.shape, a.dtype), out[col][name])
        got = jax.tree.map(lambda a: (a.shape, a.dtype), tree)
        if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
            raise ValueError(f"with_backbone_variables: {col} of the backbone do not match the model's (names or shapes)")
        out[col][name] = tree
    return out
