"""XLA's convolutions: the path on every platform (cuDNN on GPU, TPU's own, YNNPACK / Eigen on the
CPU), and the reference the project's own kernels are held to beside the float64 one.

Each direction is its own function of the same explicit arguments the oneDNN kernels take
(``jaxcnn.kernels.onednn``): the value ``fwd(x, w)``, the input gradient ``bwd_data(g, w)`` and the
kernel gradient ``bwd_weights(x, g)``; the two gradients are the exact transposes of the value, so
derivatives of any order work as usual.
"""

from __future__ import annotations

import jax
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def fwd(x, w, *, strides, pads, dilations, precision=None):
    """The convolution ``(N, H, W, C) * (kh, kw, C, O) -> (N, H_out, W_out, O)``."""
    return lax.conv_general_dilated(x, w, window_strides=strides, padding=pads, rhs_dilation=dilations,
                                    dimension_numbers=NHWC, precision=precision)


def bwd_data(g, w, *, x_shape, strides, pads, dilations, precision=None):
    """The input gradient ``(N, H_out, W_out, O), (kh, kw, C, O) -> x_shape``: the transpose of
    :func:`fwd` in ``x``."""
    f = lambda x: fwd(x, w, strides=strides, pads=pads, dilations=dilations, precision=precision)  # noqa: E731
    return jax.linear_transpose(f, jax.ShapeDtypeStruct(tuple(x_shape), g.dtype))(g)[0]


def bwd_weights(x, g, *, w_shape, strides, pads, dilations, precision=None):
    """The kernel gradient ``(N, H, W, C), (N, H_out, W_out, O) -> w_shape``: the transpose of
    :func:`fwd` in ``w``."""
    f = lambda w: fwd(x, w, strides=strides, pads=pads, dilations=dilations, precision=precision)  # noqa: E731
    return jax.linear_transpose(f, jax.ShapeDtypeStruct(tuple(w_shape), g.dtype))(g)[0]
