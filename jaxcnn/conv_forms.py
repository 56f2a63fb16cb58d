"""Formulations of one stride-1 convolution (NHWC input, HWIO kernel, explicit padding), each a
plain JAX function ``form(x, w, pads, precision)`` linear in ``x`` and in ``w``: the same
cross-correlation written differently, so each has its own speed on each CPU.

:mod:`jaxcnn.layers` uses them through its ``custom_jvp``: a form applied to ``(x, w)`` is the
value, applied to ``(dx, w)`` its transpose is the input gradient, applied to ``(x, dw)`` its
transpose is the kernel gradient; :mod:`jaxcnn.conv_tuning` times them on the machine and keeps
the fastest per shape. Every form is held to the float64 reference in
``tests/test_conv_forms.py``.

* ``xla``: :func:`jax.lax.conv_general_dilated`, XLA's own;
* ``rows``: ``kh`` matrix products of column-shifted input (its transpose in ``w`` is the kernel
  gradient as ``kh`` GEMMs);
* ``im2col``: one matrix product of all ``kh * kw`` shifts side by side, ``(N·H·W, kh·kw·C)``;
* ``winograd``: Winograd's F(2×2, 3×3) (Lavin & Gray 2016), 3×3 kernels only: 16 products of
  transformed 4×4 input tiles with the transformed kernel, 2.25× fewer multiplications.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def xla(x, w, pads, precision):
    return lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=pads, dimension_numbers=_NHWC,
                                    precision=precision)


def rows(x, w, pads, precision):
    """``kh`` matrix products: the ``kw`` column shifts of the padded input side by side on the
    channel axis (``cols``, ``(N, Hp, W_out, kw * C)``), and for each kernel row ``i``, rows
    ``i .. i + H_out`` of ``cols`` times ``w[i]`` (``(kw * C, C_out)``).

    Its transpose in ``w`` is what reverse mode needs: ``dW[i] = cols[:, i:i + H_out]^T @ g``,
    ``kh`` matrix products with the batch and the pixels as their long inner dimension.
    """
    kh, kw, c, c_out = w.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    h_out, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    cols = jnp.concatenate([xp[:, :, j:j + w_out, :] for j in range(kw)], axis=-1)
    parts = [lax.dot(cols[:, i:i + h_out].reshape(-1, kw * c), w[i].reshape(kw * c, c_out), precision=precision)
             for i in range(kh)]  # 2-D products: their transposes are plain (N * H_out * W_out)-long GEMMs
    return functools.reduce(jnp.add, parts).reshape(x.shape[0], h_out, w_out, c_out)


def im2col(x, w, pads, precision):
    """One matrix product: every ``(i, j)`` shift of the padded input side by side on the channel
    axis, ``(N·H_out·W_out, kh·kw·C)``, times the kernel as ``(kh·kw·C, C_out)``."""
    kh, kw, c, c_out = w.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    h_out, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    patches = jnp.concatenate([xp[:, i:i + h_out, j:j + w_out, :] for i in range(kh) for j in range(kw)], axis=-1)
    y = lax.dot(patches.reshape(-1, kh * kw * c), w.reshape(kh * kw * c, c_out), precision=precision)
    return y.reshape(x.shape[0], h_out, w_out, c_out)


def _input_transform(t0, t1, t2, t3):
    """``B^T d`` along one axis of a 4-tap tile: the rows of ``B^T`` are (1, 0, -1, 0),
    (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)."""
    return t0 - t2, t1 + t2, t2 - t1, t1 - t3


def _kernel_transform(g0, g1, g2):
    """``G g`` along one axis of a 3-tap kernel: the rows of ``G`` are (1, 0, 0),
    (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1)."""
    half_sum = (g0 + g2) * 0.5
    return g0, half_sum + g1 * 0.5, half_sum - g1 * 0.5, g2


def _output_transform(m0, m1, m2, m3):
    """``A^T m`` along one axis: the rows of ``A^T`` are (1, 1, 1, 0), (0, 1, -1, -1)."""
    return m0 + m1 + m2, m1 - m2 - m3


def winograd(x, w, pads, precision):
    """Winograd's F(2×2, 3×3): each 2×2 block of outputs from its 4×4 input tile ``d`` as
    ``A^T [(G g G^T) ⊙ (B^T d B)] A``, the elementwise product summed over the input channels,
    i.e. 16 matrix products ``(N·tiles, C) @ (C, C_out)``. 3×3 kernels only."""
    kh, kw, c, c_out = w.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"winograd: the kernel must be 3x3, got {kh}x{kw}")
    n = x.shape[0]
    (top, bottom), (left, right) = pads
    h_out, w_out = x.shape[1] + top + bottom - 2, x.shape[2] + left + right - 2
    th, tw = -(-h_out // 2), -(-w_out // 2)
    # pad to whole tiles: 2 * tiles + 2 rows / columns, the extra ones zeros, their outputs cut off
    xp = jnp.pad(x, ((0, 0), (top, 2 * th + 2 - x.shape[1] - top), (left, 2 * tw + 2 - x.shape[2] - left), (0, 0)))
    along_h = _input_transform(*(xp[:, r:r + 2 * th:2] for r in range(4)))  # each (N, th, Wp, C)
    tiles = [t for u in along_h for t in _input_transform(*(u[:, :, s:s + 2 * tw:2] for s in range(4)))]
    v = jnp.stack(tiles).reshape(16, n * th * tw, c)
    gh = _kernel_transform(w[0], w[1], w[2])  # each (3, C, C_out)
    u = jnp.stack([t for g in gh for t in _kernel_transform(g[0], g[1], g[2])])  # (16, C, C_out)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)  # (16, N·th·tw, C_out)
    m = m.reshape(4, 4, n, th, tw, c_out)
    out_h = _output_transform(m[0], m[1], m[2], m[3])  # each (4, N, th, tw, C_out)
    y = jnp.stack([jnp.stack(_output_transform(o[0], o[1], o[2], o[3]), axis=-2) for o in out_h], axis=2)
    # y: (N, th, 2 [row in tile], tw, 2 [column in tile], C_out)
    return y.reshape(n, 2 * th, 2 * tw, c_out)[:, :h_out, :w_out]


#: Every form by name.
FORMS = {"xla": xla, "rows": rows, "im2col": im2col, "winograd": winograd}
