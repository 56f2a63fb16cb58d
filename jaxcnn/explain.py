"""Grad-CAM: where in an image a trained model found its evidence for a class.

    from jaxcnn import explain, inference
    run = inference.restore("runs/a")
    maps = explain.grad_cam(run.model, run.variables, images_uint8, preprocess=run.preprocess)  # (N, H, W)

Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) takes a feature map ``A`` ``(h, w, C)``
inside the network and the model's score ``y_c`` for class ``c`` (its output: the logit for the
models runs train here; a ``ResNet`` with ``classifier_activation="softmax"`` outputs the
probability, and that is what is explained) and computes::

    alpha[k] = mean over (i, j) of  d y_c / d A[i, j, k]        # (C,) one weight per channel
    cam      = ReLU( sum_k alpha[k] * A[:, :, k] )               # (h, w)

then resizes ``cam`` to the image's ``(H, W)`` (bilinear, ``jax.image.resize``) and divides it
by its maximum, so each map lies in [0, 1] with its maximum at 1 (a map with no positive
evidence anywhere stays all zeros).

The feature map is the output of a submodule named by its path, e.g. ``"block3_bn2"`` or
``"backbone/conv5_block3_out"``. It is read, and its gradient taken, by intercepting that
submodule's call (``flax.linen.intercept_methods``) and adding a zero perturbation: the
gradient with respect to the perturbation is ``d y_c / d A``. The model's code is not changed.

Default layers (:func:`default_layer`; pass ``layer=`` for another):

* :class:`~jaxcnn.models.CifarCNN`: its last conv block's output before the block's max-pool,
  ``block{B}_bn2`` (``8 x 8`` for a 32-pixel image with three blocks);
* :class:`~jaxcnn.models.ResNet` (ResNet50, ResNetSmall, ...): the last stage's output,
  ``conv5_block{n}_out`` (``7 x 7`` at 224 pixels; at 32 pixels it is ``1 x 1``, a map that
  cannot say where: pass an earlier stage such as ``backbone/conv4_block1_out``);
* :class:`~jaxcnn.models.Classifier`: its backbone's, under ``backbone/``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.models import CifarCNN, Classifier, ResNet
from jaxcnn.preprocess import scale_to_unit

__all__ = ["check_layer", "default_layer", "feature_layers", "grad_cam"]


def default_layer(model: nn.Module) -> str:
    """The path of the feature map :func:`grad_cam` explains by default (see the module's docstring).

    Raises ValueError for a model of another class: pass ``layer=`` to :func:`grad_cam`.
    """
    if isinstance(model, CifarCNN):
        return f"block{len(model.widths)}_bn2"
    if isinstance(model, ResNet):
        return f"conv{len(model.stage_sizes) + 1}_block{model.stage_sizes[-1]}_out"
    if isinstance(model, Classifier):
        return "backbone/" + default_layer(model.backbone)
    raise ValueError(f"grad_cam: no default layer for a {type(model).__name__}; pass layer='<submodule path>' "
                     f"(feature_layers(model, ...) lists them)")


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def _outputs(model: nn.Module, variables: dict, x) -> list[tuple[str, tuple]]:
    """``[(submodule path, output shape), ...]`` in call order, from an abstract forward pass."""
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            seen.append((_path(context.module), tuple(getattr(out, "shape", ()))))
        return out

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, variables, x)
    return seen


def feature_layers(model: nn.Module, variables: dict, image_shape) -> list[str]:
    """The submodule paths whose output is a ``(N, h, w, C)`` feature map, in call order: the
    values ``grad_cam``'s ``layer=`` takes. ``image_shape``: ``(H, W, C)``."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return [p for p, shape in _outputs(model, variables, x) if len(shape) == 4]


def check_layer(model: nn.Module, variables: dict, image_shape, layer: str, *, batch: int = 1) -> tuple:
    """The output shape ``(batch, h, w, C)`` of the submodule ``layer`` for images of ``image_shape``
    ``(H, W, C)``; ValueError naming the layer and the model's feature maps when it is not one."""
    if not isinstance(layer, str):
        raise TypeError(f"grad_cam: layer must be a submodule path (str), got {layer!r}")
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    outputs = _outputs(model, variables, x)
    shapes = [s for p, s in outputs if p == layer]
    maps = [p for p, s in outputs if len(s) == 4]
    if not shapes:
        shown = ", ".join(maps[-20:]) + (f" (the last 20 of {len(maps)})" if len(maps) > 20 else "")
        raise ValueError(f"grad_cam: layer={layer!r} is not a submodule of this {type(model).__name__}; "
                         f"its feature maps: {shown}")
    if len(shapes) > 1:
        raise ValueError(f"grad_cam: layer={layer!r} is called {len(shapes)} times in one forward pass; "
                         f"name a submodule called once")
    if len(shapes[0]) != 4:
        raise ValueError(f"grad_cam: layer={layer!r} outputs shape {shapes[0]}; Grad-CAM needs a (N, h, w, C) "
                         f"feature map")
    return shapes[0]


@functools.partial(jax.jit, static_argnames=("model", "layer", "preprocess"))
def _cam(model, variables, images, class_index, eps, *, layer, preprocess):
    """``(maps (B, H, W), not yet normalised; scores (B, K))`` of one batch; ``class_index`` (B,), -1: the top."""
    x = preprocess(images)

    def forward(eps):
        captured = []

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _path(context.module) == layer:
                out = out + eps.astype(out.dtype)  # eps = 0: the value is unchanged, its gradient is dy/dA
                captured.append(out)
            return out

        with nn.intercept_methods(perturb):
            scores = model.apply(variables, x, train=False)
        return scores.astype(jnp.float32), captured[0]

    scores, pullback, feats = jax.vjp(forward, eps, has_aux=True)  # (B, K), (B, h, w, C)
    k = jnp.where(class_index < 0, jnp.argmax(scores, axis=-1), class_index)  # (B,)
    (grads,) = pullback(jax.nn.one_hot(k, scores.shape[-1], dtype=scores.dtype))  # (B, h, w, C): dy_k/dA per image
    alpha = grads.astype(jnp.float32).mean(axis=(1, 2))  # (B, C)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feats.astype(jnp.float32), alpha))  # (B, h, w)
    return jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), method="bilinear"), scores  # (B, H, W)


def _normalise(cam: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (on the host: XLA may divide by multiplying by a reciprocal,
    which leaves the maximum at 1 - 2**-24); a map without a positive value becomes zeros."""
    top = cam.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, np.clip(cam, 0, None) / np.where(top > 0, top, 1), 0).astype(np.float32)


def grad_cam(model: nn.Module, variables: dict, images, *, preprocess: Callable = scale_to_unit,
             layer: Optional[str] = None, class_index=None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` float32 in [0, 1] for uint8 images ``(N, H, W, C)``.

    Args:
      model, variables: the model (applied as ``model.apply(variables, preprocess(x), train=False)``)
        and its variables, e.g. ``jaxcnn.inference.restore(run)``'s.
      images: uint8 ``(N, H, W, C)``, as ``jaxcnn.inference.predict`` takes them.
      preprocess: the run's preprocessing (``Restored.preprocess``).
      layer: the path of the submodule whose output ``(N, h, w, C)`` is explained (``"block3_bn2"``,
        ``"backbone/conv4_block1_out"``); default :func:`default_layer`.
      class_index: the class explained: None (each image's top-scoring class, the prediction),
        an int for every image, or ``(N,)`` ints.
      batch_size: images per forward and backward pass (the last batch padded).

    Returns:
      ``(N, H, W)``: pixel ``[n, i, j]`` is how much the region around ``(i, j)`` raised image
      ``n``'s score for the class, relative to the image's strongest region (1); 0 where it did
      not raise it. A map is all zeros when no region raised the score.
    """
    fn = "grad_cam"
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{fn}: images must be (N, H, W, C), got shape {images.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size={batch_size!r}; must be an int >= 1")
    layer = default_layer(model) if layer is None else layer
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32)
    batch_size = min(batch_size, n)
    feat_shape = check_layer(model, variables, images.shape[1:], layer, batch=batch_size)
    x = jax.ShapeDtypeStruct((batch_size, *images.shape[1:]), jnp.float32)
    out_shape = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape
    num_classes = out_shape[-1]
    if class_index is None:
        index = np.full((n,), -1, np.int32)
    else:
        index = np.asarray(class_index)
        if not np.issubdtype(index.dtype, np.integer) or index.ndim > 1 or (index.ndim == 1 and index.shape != (n,)):
            raise ValueError(f"{fn}: class_index must be None, an int or ({n},) ints, got {class_index!r}")
        if index.size and (index.min() < 0 or index.max() >= num_classes):
            raise ValueError(f"{fn}: class_index={class_index!r} outside [0, {num_classes}) (the model's classes)")
        index = np.broadcast_to(index, (n,)).astype(np.int32)
    eps = jnp.zeros(feat_shape, jnp.float32)
    maps = []
    for start in range(0, n, batch_size):
        chunk, k = images[start:start + batch_size], index[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:  # one compiled shape for every batch
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            k = np.concatenate([k, np.full((pad,), -1, np.int32)])
        cam, _ = _cam(model, variables, chunk, k, eps, layer=layer, preprocess=preprocess)
        maps.append(_normalise(np.asarray(cam)[: batch_size - pad]))
    return np.concatenate(maps)
