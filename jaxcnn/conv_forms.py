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
* ``rows_wt``: ``rows`` with each product written as ``(w[i]^T @ cols^T)^T`` (its kernel gradient
  is ``g^T @ cols``, another GEMM layout);
* ``im2col``: one matrix product of all ``kh * kw`` shifts side by side, ``(N·H·W, kh·kw·C)``;
* ``winograd``: Winograd's F(2×2, 3×3) (Lavin & Gray 2016), 3×3 kernels only: 16 products of
  transformed 4×4 input tiles with the transformed kernel, 2.25× fewer multiplications;
* ``winograd4``: F(4×4, 3×3): 36 products of transformed 6×6 tiles, 4× fewer multiplications, a
  transformed input 2.25× the input's size (F(2×2, 3×3)'s is 4×).
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


def rows_wt(x, w, pads, precision):
    """:func:`rows` with each product written the other way round, ``(w[i]^T @ cols_i^T)^T``: the
    same sums, but its transpose in ``w`` is the kernel gradient as ``g^T @ cols_i``
    (``(C_out, kw·C)`` products), a layout XLA runs faster at some shapes (measured:
    ``benchmarks/README.md``)."""
    kh, kw, c, c_out = w.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    h_out, w_out = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    cols = jnp.concatenate([xp[:, :, j:j + w_out, :] for j in range(kw)], axis=-1)
    parts = [lax.dot_general(w[i].reshape(kw * c, c_out), cols[:, i:i + h_out].reshape(-1, kw * c),
                             (((0,), (1,)), ((), ())), precision=precision).T for i in range(kh)]
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


#: Winograd's minimal filtering F(m, 3) (Lavin & Gray 2016), as ``(B^T, G, A^T)``: a tile of
#: ``m + 2`` inputs ``d`` and a 3-tap kernel ``g`` give the ``m`` outputs ``A^T [(G g) ⊙ (B^T d)]``.
#: F(2, 3) interpolates at 0, 1, -1, ∞; F(4, 3) at 0, ±1, ±2, ∞ (larger coefficients: its float32
#: rounding is larger too, ``tests/test_conv_forms.py`` bounds it).
_WINOGRAD = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(matrix, taps):
    """``matrix @ taps`` along a list of arrays: each row's sum of its nonzero coefficients times
    the taps (a coefficient of ±1 adds or subtracts, no multiplication)."""
    out = []
    for row in matrix:
        terms = [t if c == 1 else -t if c == -1 else t * c for c, t in zip(row, taps) if c != 0]
        out.append(functools.reduce(jnp.add, terms))
    return out


def _winograd(x, w, pads, precision, m):
    """Winograd's F(m×m, 3×3): each ``m × m`` block of outputs from its ``(m + 2)²`` input tile ``d``
    as ``A^T [(G g G^T) ⊙ (B^T d B)] A``, the elementwise product summed over the input channels,
    i.e. ``(m + 2)²`` matrix products ``(N·tiles, C) @ (C, C_out)``. 3×3 kernels only."""
    kh, kw, c, c_out = w.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"winograd: the kernel must be 3x3, got {kh}x{kw}")
    bt, g_mat, at = _WINOGRAD[m]
    a = m + 2
    n = x.shape[0]
    (top, bottom), (left, right) = pads
    h_out, w_out = x.shape[1] + top + bottom - 2, x.shape[2] + left + right - 2
    th, tw = -(-h_out // m), -(-w_out // m)
    # pad to whole tiles: m * tiles + 2 rows / columns, the extra ones zeros, their outputs cut off
    xp = jnp.pad(x, ((0, 0), (top, m * th + 2 - x.shape[1] - top), (left, m * tw + 2 - x.shape[2] - left), (0, 0)))
    along_h = _combine(bt, [xp[:, r:r + m * th:m] for r in range(a)])  # each (N, th, Wp, C)
    tiles = [t for u in along_h for t in _combine(bt, [u[:, :, s:s + m * tw:m] for s in range(a)])]
    v = jnp.stack(tiles).reshape(a * a, n * th * tw, c)
    gh = _combine(g_mat, [w[0], w[1], w[2]])  # each (3, C, C_out)
    u = jnp.stack([t for g in gh for t in _combine(g_mat, [g[0], g[1], g[2]])])  # (a², C, C_out)
    prod = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)  # (a², N·th·tw, C_out)
    prod = prod.reshape(a, a, n, th, tw, c_out)
    out_h = _combine(at, [prod[i] for i in range(a)])  # m arrays, each (a, N, th, tw, C_out)
    y = jnp.stack([jnp.stack(_combine(at, [o[j] for j in range(a)]), axis=-2) for o in out_h], axis=2)
    # y: (N, th, m [row in tile], tw, m [column in tile], C_out)
    return y.reshape(n, m * th, m * tw, c_out)[:, :h_out, :w_out]


def winograd(x, w, pads, precision):
    """Winograd's F(2×2, 3×3): 16 products of transformed 4×4 tiles, 2.25× fewer multiplications
    than the direct form; the transformed input is 4× the input."""
    return _winograd(x, w, pads, precision, 2)


def winograd4(x, w, pads, precision):
    """Winograd's F(4×4, 3×3): 36 products of transformed 6×6 tiles, 4× fewer multiplications
    than the direct form; the transformed input is 2.25× the input."""
    return _winograd(x, w, pads, precision, 4)


#: Every form by name.
FORMS = {"xla": xla, "rows": rows, "rows_wt": rows_wt, "im2col": im2col, "winograd": winograd, "winograd4": winograd4}
