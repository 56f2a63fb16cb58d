"""Pure-function CNN layers: convolution, pooling and the dropout family.

Every function here is a plain function of arrays and explicit hyperparameters:
no hidden state, no global random number generator. Data layout is fixed and named:

* images / feature maps ``x``: ``NHWC`` — (batch, height, width, channels)
* convolution kernels ``w``: ``HWIO`` — (kernel height, kernel width, in channels, out channels)

Hyperparameters (strides, paddings, windows, rates, ``train``) are Python values and
must be static under :func:`jax.jit` (use ``static_argnames`` or close over them);
arrays may be float16, bfloat16, float32 or float64. All functions are differentiable.

Padding, wherever it is accepted, may be:

* ``"SAME"`` — output size ``ceil(H / stride)``, extra padding on the bottom/right
  (the TensorFlow / Keras rule);
* ``"VALID"`` — no padding;
* an ``int`` ``p`` — ``p`` rows/columns on every side;
* a pair ``(ph, pw)`` — ``ph`` rows top and bottom, ``pw`` columns left and right;
* per-side pairs ``((top, bottom), (left, right))``.

Randomness (dropout family) comes only from the explicit ``key`` argument; ``rate`` is
always the probability of **zeroing** a unit (not of keeping it).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn import kernels

__all__ = [
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "global_avg_pool2d",
    "global_max_pool2d",
    "dropout",
    "spatial_dropout2d",
    "dropblock",
    "resolve_padding",
]

IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]]
Pads = Tuple[Tuple[int, int], Tuple[int, int]]

# --------------------------------------------------------------------------- checks


def _check_array(fn: str, name: str, x, rank: Optional[int] = None, layout: str = "") -> None:
    """Raise TypeError unless ``x`` is a floating-point array (of ``rank`` dims, if given)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}")
    if rank is not None and x.ndim != rank:
        raise ValueError(
            f"{fn}: {name} must have rank {rank}{' (' + layout + ')' if layout else ''}, "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}; convert images first, e.g. x.astype(jnp.float32) / 255"
        )


def _pair(fn: str, name: str, value: IntPair) -> Tuple[int, int]:
    """Normalise an int or a pair of ints to a pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: {name} must be a positive int or a pair of positive ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{fn}: {name} must be positive, got {value!r}")
    return pair


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def resolve_padding(
    padding: Padding,
    in_hw: Sequence[int],
    window_hw: Sequence[int],
    stride_hw: Sequence[int],
    *,
    fn: str = "resolve_padding",
) -> Pads:
    """Turn any accepted padding spec into explicit ``((top, bottom), (left, right))``.

    ``window_hw`` is the *effective* window (for a dilated kernel ``(k - 1) * d + 1``).
    ``"SAME"`` follows TensorFlow: total padding ``max((ceil(H / s) - 1) * s + k - H, 0)``,
    with the odd extra row/column at the bottom/right.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, k, s in zip(in_hw, window_hw, stride_hw):
                out = -(-size // s)  # ceil
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            return (tuple(pads[0]), tuple(pads[1]))  # type: ignore[return-value]
        raise ValueError(f"{fn}: padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    if _is_int(padding):
        p = int(padding)
        pads: Pads = ((p, p), (p, p))
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(_is_int(v) for v in padding):
        pads = ((int(padding[0]),) * 2, (int(padding[1]),) * 2)  # type: ignore[assignment]
    elif (
        isinstance(padding, (tuple, list))
        and len(padding) == 2
        and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p) for p in padding)
    ):
        pads = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    else:
        raise TypeError(
            f"{fn}: padding must be 'SAME', 'VALID', an int, a pair (ph, pw) or "
            f"((top, bottom), (left, right)), got {padding!r}"
        )
    if any(v < 0 for p in pads for v in p):
        raise ValueError(f"{fn}: padding must be non-negative, got {padding!r}")
    return pads


def _check_window_fits(fn: str, x_hw, window_hw, pads: Pads, what: str) -> None:
    for axis, size, k, (lo, hi) in zip(("height", "width"), x_hw, window_hw, pads):
        if size + lo + hi < k:
            raise ValueError(
                f"{fn}: the {what} ({k} along {axis}) is larger than the padded input "
                f"({size} + {lo} + {hi} = {size + lo + hi}); use a smaller {what}, more padding or 'SAME'"
            )


# --------------------------------------------------------------------------- convolution


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: Optional[jax.Array] = None,
    *,
    stride: IntPair = 1,
    padding: Padding = "SAME",
    dilation: IntPair = 1,
    precision: Optional[lax.Precision] = None,
) -> jax.Array:
    """2-D convolution (cross-correlation, as in every deep learning library).

    Args:
      x: input, ``(N, H, W, C_in)``, floating point.
      w: kernel, ``(kh, kw, C_in, C_out)`` (HWIO), same dtype as ``x``.
      b: optional bias, ``(C_out,)``.
      stride: int or ``(sh, sw)``, positive.
      padding: ``"SAME"``, ``"VALID"``, int, ``(ph, pw)`` or ``((top, bottom), (left, right))``;
        explicit padding adds zeros.
      dilation: kernel (atrous) dilation, int or ``(dh, dw)``, positive.
      precision: passed to :func:`jax.lax.conv_general_dilated` (e.g. ``"highest"`` on GPU/TPU).

    How it is computed is :mod:`jaxcnn.kernels`' choice: in float32 on an x86-64 CPU, the project's
    oneDNN kernels (value, input and kernel gradient) where they were built at install, else XLA's
    :func:`jax.lax.conv_general_dilated` (always on GPU and TPU, and for other dtypes); the switch is
    ``JAXCNN_KERNELS=auto|onednn|xla``. Both give the same result up to float32 rounding, and
    ``jit``, ``grad``, ``jvp`` and ``vmap`` work on both, to any order.

    Returns:
      ``(N, H_out, W_out, C_out)`` with ``H_out = (H + top + bottom - ((kh - 1) * dh + 1)) // sh + 1``
      (likewise for the width); for ``"SAME"``, ``H_out = ceil(H / sh)``.

    Example:
      >>> x = jnp.ones((1, 5, 5, 1)); w = jnp.ones((3, 3, 1, 2))
      >>> conv2d(x, w, padding="VALID").shape
      (1, 3, 3, 2)
    """
    fn = "conv2d"
    _check_array(fn, "x", x, 4, "N, H, W, C_in")
    _check_array(fn, "w", w, 4, "kh, kw, C_in, C_out")
    if x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"conv2d: x has {x.shape[-1]} channels but w expects {w.shape[2]} "
            f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)}; w is HWIO)"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"conv2d: x is {x.dtype} but w is {w.dtype}; cast one of them so both match")
    if b is not None:
        _check_array(fn, "b", b, 1, "C_out")
        if b.shape[0] != w.shape[3]:
            raise ValueError(f"conv2d: b has shape {tuple(b.shape)} but w has {w.shape[3]} output channels")
    strides = _pair(fn, "stride", stride)
    dilations = _pair(fn, "dilation", dilation)
    eff_k = tuple((k - 1) * d + 1 for k, d in zip(w.shape[:2], dilations))
    pads = resolve_padding(padding, x.shape[1:3], eff_k, strides, fn=fn)
    _check_window_fits(fn, x.shape[1:3], eff_k, pads, "dilated kernel" if dilations != (1, 1) else "kernel")
    y = kernels.conv2d(x, w, strides=strides, pads=pads, dilations=dilations, precision=precision)
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


# --------------------------------------------------------------------------- pooling


def _pool_args(fn: str, x, window, stride, padding):
    _check_array(fn, "x", x, 4, "N, H, W, C")
    win = _pair(fn, "window", window)
    strides = win if stride is None else _pair(fn, "stride", stride)
    pads = resolve_padding(padding, x.shape[1:3], win, strides, fn=fn)
    _check_window_fits(fn, x.shape[1:3], win, pads, "window")
    return (1, *win, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))


def max_pool2d(
    x: jax.Array, window: IntPair = 2, *, stride: Optional[IntPair] = None, padding: Padding = "VALID"
) -> jax.Array:
    """Max pooling over ``window`` × ``window`` patches of each channel.

    Args:
      x: ``(N, H, W, C)``, floating point.
      window: int or ``(kh, kw)``, positive.
      stride: int or ``(sh, sw)``; defaults to ``window`` (non-overlapping windows).
      padding: as in :func:`conv2d`. Padded positions hold ``-inf`` and are never selected.
        (Keras' ``ZeroPadding2D`` + pool pads zeros instead: pad with :func:`jax.numpy.pad`
        yourself for that.)

    Returns:
      ``(N, H_out, W_out, C)``; the gradient flows to the arg-max of each window (the first in
      row-major order where several elements tie). Windows that tile ``x`` exactly (stride =
      window, no padding, ``H`` and ``W`` multiples of it) take that derivative as element-wise
      selections on the window's taps (faster on the CPU than ``lax.reduce_window``'s
      select-and-scatter; measured: ``benchmarks/README.md``); the value is always
      :func:`jax.lax.reduce_window`'s. Both derivatives give the same gradients, bit for bit.

    Example (the seed's 4×4 example):
      >>> x = jnp.array([[1, 3, 2, 4], [5, 6, 7, 8], [2, 1, 4, 3], [9, 8, 6, 5]], jnp.float32)
      >>> max_pool2d(x[None, :, :, None])[0, :, :, 0]   # [[6, 8], [9, 6]]
    """
    dims, strides, pads = _pool_args("max_pool2d", x, window, stride, padding)
    kh, kw = dims[1:3]
    if (_POOL_TILES and strides == dims and all(p == (0, 0) for p in pads)
            and x.shape[1] % kh == 0 and x.shape[2] % kw == 0):
        return _max_pool_tiles(x, kh, kw)
    return _window_max(x, dims, strides, pads)


def _window_max(x, dims, strides, pads):
    """``lax.reduce_window`` max with ``-inf`` padding. The init value must be a concrete (NumPy)
    constant: a traced one makes lax.reduce_window fall back to its generic, non-differentiable
    form under jit."""
    return lax.reduce_window(x, np.array(-np.inf, dtype=x.dtype), lax.max, dims, strides, pads)


#: Tiling windows with the derivative of ``_max_pool_tiles``; ``False`` gives ``lax.reduce_window``'s
#: everywhere (benchmarks compare the two).
_POOL_TILES = True


def _window_taps(x, kh, kw):
    """The ``kh * kw`` elements of each non-overlapping window as a list of ``(N, H/kh, W/kw, C)``
    arrays, in row-major order within the window."""
    n, h, w, c = x.shape
    xr = x.reshape(n, h // kh, kh, w // kw, kw, c)
    return [xr[:, :, i, :, j, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _max_pool_tiles(x, kh, kw):
    """Max pooling of non-overlapping ``kh × kw`` windows that tile ``x`` exactly (stride = window,
    no padding): ``lax.reduce_window``'s value (faster than the maximum of the taps on the CPU),
    with the derivative below."""
    window = (1, kh, kw, 1)
    return _window_max(x, window, window, ((0, 0),) * 4)


@_max_pool_tiles.defjvp
def _max_pool_tiles_jvp(kh, kw, primals, tangents):
    """The tangent of each window's maximum is the tangent of its first maximal element (row-major),
    as ``lax.reduce_window``'s derivative picks it: element-wise selections, whose transpose routes
    each output's gradient back to that element."""
    (x,), (dx,) = primals, tangents
    y = _max_pool_tiles(x, kh, kw)
    taken = jnp.zeros(y.shape, bool)
    ty = jnp.zeros_like(y)
    for xt, dt in zip(_window_taps(x, kh, kw), _window_taps(dx, kh, kw)):
        pick = (xt == y) & ~taken
        ty = jnp.where(pick, dt, ty)
        taken = taken | pick
    return y, ty


def avg_pool2d(
    x: jax.Array, window: IntPair = 2, *, stride: Optional[IntPair] = None, padding: Padding = "VALID"
) -> jax.Array:
    """Average pooling over ``window`` × ``window`` patches of each channel.

    Args:
      x: ``(N, H, W, C)``, floating point.
      window: int or ``(kh, kw)``, positive.
      stride: int or ``(sh, sw)``; defaults to ``window``.
      padding: as in :func:`conv2d`. Padded positions are excluded from the average
        (each output divides by the number of real input elements in its window, as
        Keras' ``AveragePooling2D(padding="same")`` does).

    Returns:
      ``(N, H_out, W_out, C)``.
    """
    dims, strides, pads = _pool_args("avg_pool2d", x, window, stride, padding)
    zero = np.array(0, dtype=x.dtype)  # concrete, as in max_pool2d
    summed = lax.reduce_window(x, zero, lax.add, dims, strides, pads)
    if all(p == (0, 0) for p in pads):
        return summed / math.prod(dims)
    # (1, H_out, W_out, 1): how many real elements each window covers.
    ones = jnp.ones((1, *x.shape[1:3], 1), dtype=x.dtype)
    counts = lax.reduce_window(ones, zero, lax.add, dims, strides, pads)
    return summed / counts


def global_avg_pool2d(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: ``(N, H, W, C) -> (N, C)``."""
    _check_array("global_avg_pool2d", "x", x, 4, "N, H, W, C")
    return jnp.mean(x, axis=(1, 2))


def global_max_pool2d(x: jax.Array) -> jax.Array:
    """Maximum over the spatial axes: ``(N, H, W, C) -> (N, C)``."""
    _check_array("global_max_pool2d", "x", x, 4, "N, H, W, C")
    return jnp.max(x, axis=(1, 2))


# --------------------------------------------------------------------------- dropout family


def _dropout_args(fn: str, x, rate, key, train, rank: Optional[int] = None, layout: str = "") -> bool:
    """Validate the common dropout arguments; return True when the call is the identity."""
    _check_array(fn, "x", x, rank, layout)
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            f"{fn}: train must be a Python bool (static under jit), got {train!r} of type {type(train).__name__}"
        )
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: rate must be a Python float in [0, 1] (static under jit), got {rate!r}")
    if not 0.0 <= float(rate) <= 1.0 or math.isnan(float(rate)):
        raise ValueError(f"{fn}: rate is the probability of zeroing a unit and must be in [0, 1], got {rate!r}")
    if not train or float(rate) == 0.0:
        return True
    if key is None:
        raise ValueError(f"{fn}: train=True needs a PRNG key: pass key=jax.random.key(...) (or train=False)")
    return False


def bernoulli(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, drawn flat and reshaped.

    The values are the same (threefry's counters run over the flat index), but XLA's CPU
    compile time grows steeply with the rank of a random draw (measured in ``benchmarks/README.md``).
    """
    return jax.random.bernoulli(key, p, (math.prod(shape),)).reshape(shape)


def _apply_keep_mask(x: jax.Array, keep: jax.Array, scale) -> jax.Array:
    """``x * keep * scale`` written with ``where`` so that dropped units give exact zeros."""
    return jnp.where(keep, x * jnp.asarray(scale, dtype=x.dtype), jnp.zeros((), x.dtype))


def dropout(x: jax.Array, rate: float, *, key: Optional[jax.Array] = None, train: bool) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by ``1 / (1 - rate)``.

    Args:
      x: any shape, floating point.
      rate: probability of **zeroing** an element, in ``[0, 1]`` (0.5 drops half).
      key: a :func:`jax.random.key`; required when ``train`` is True and ``rate > 0``.
      train: ``False`` returns ``x`` unchanged (inference); ``True`` samples a mask.

    Returns:
      An array like ``x``. Its expectation over masks equals ``x``. ``rate=1`` gives zeros.
    """
    if _dropout_args("dropout", x, rate, key, train):
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = bernoulli(key, 1.0 - rate, x.shape)
    return _apply_keep_mask(x, keep, 1.0 / (1.0 - rate))


def spatial_dropout2d(x: jax.Array, rate: float, *, key: Optional[jax.Array] = None, train: bool) -> jax.Array:
    """Spatial dropout (Keras ``SpatialDropout2D``): zero whole feature maps.

    Each ``(example, channel)`` map of ``x`` is zeroed with probability ``rate`` and the
    kept maps are scaled by ``1 / (1 - rate)``. Neighbouring pixels of a conv feature map
    are strongly correlated, so dropping single pixels regularises little; dropping the
    whole map does (Tompson et al. 2015).

    Args:
      x: ``(N, H, W, C)``, floating point.
      rate: probability of zeroing a feature map, in ``[0, 1]``.
      key: PRNG key, required when training with ``rate > 0``.
      train: ``False`` is the identity.

    Returns:
      ``(N, H, W, C)``.
    """
    if _dropout_args("spatial_dropout2d", x, rate, key, train, 4, "N, H, W, C"):
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    n, _, _, c = x.shape
    keep = bernoulli(key, 1.0 - rate, (n, 1, 1, c))  # one draw per (example, channel)
    return _apply_keep_mask(x, keep, 1.0 / (1.0 - rate))


def dropblock_gamma(rate: float, block_hw: Tuple[int, int], feat_hw: Tuple[int, int]) -> float:
    """DropBlock's seed probability γ (Ghiasi et al. 2018, eq. 1, for rectangular maps).

    ``γ = rate · H·W / (bh·bw · (H − bh + 1)·(W − bw + 1))``, clipped to 1: with seeds only
    where a whole block fits, each seed zeroes ``bh·bw`` units, so about ``rate`` of the
    units are dropped (a little less when blocks overlap).
    """
    (bh, bw), (h, w) = block_hw, feat_hw
    return min(1.0, rate * h * w / (bh * bw * (h - bh + 1) * (w - bw + 1)))


def dropblock(
    x: jax.Array, rate: float, *, block_size: int = 7, key: Optional[jax.Array] = None, train: bool
) -> jax.Array:
    """DropBlock (Ghiasi et al. 2018): zero contiguous ``block_size`` × ``block_size`` regions.

    Block seeds are sampled independently for every ``(example, channel)`` map with
    probability γ (:func:`dropblock_gamma`), only at positions where the whole block fits
    inside the map; each seed zeroes the block whose top-left corner it is. The result is
    renormalised by ``count(mask) / count_ones(mask)`` over the whole tensor, so the mean
    activation is preserved. ``block_size`` larger than the map is clipped to the map
    (then DropBlock drops whole maps, like :func:`spatial_dropout2d`); ``block_size=1`` is
    plain dropout with rate γ = rate.

    Args:
      x: ``(N, H, W, C)``, floating point.
      rate: target fraction of units to zero (``keep_prob = 1 - rate`` in the paper), in ``[0, 1]``.
      block_size: side of the square block, positive int.
      key: PRNG key, required when training with ``rate > 0``.
      train: ``False`` is the identity.

    Returns:
      ``(N, H, W, C)``; ``rate=1`` gives zeros (no NaN).
    """
    fn = "dropblock"
    if not _is_int(block_size) or block_size <= 0:
        raise ValueError(f"dropblock: block_size must be a positive int, got {block_size!r}")
    if _dropout_args(fn, x, rate, key, train, 4, "N, H, W, C"):
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    n, h, w, c = x.shape
    bh, bw = min(block_size, h), min(block_size, w)
    gamma = dropblock_gamma(float(rate), (bh, bw), (h, w))
    # (N, H - bh + 1, W - bw + 1, C): block seeds, at top-left corners where a block fits.
    seeds = bernoulli(key, gamma, (n, h - bh + 1, w - bw + 1, c)).astype(x.dtype)
    # Grow each seed into its block: dropped[y, x] = max over the seeds whose block covers (y, x).
    dropped = lax.reduce_window(
        seeds,
        np.array(0, x.dtype),
        lax.max,
        (1, bh, bw, 1),
        (1, 1, 1, 1),
        ((0, 0), (bh - 1, bh - 1), (bw - 1, bw - 1), (0, 0)),
    )  # (N, H, W, C)
    keep = dropped == 0
    kept = jnp.sum(keep, dtype=jnp.float32)
    scale = jnp.where(kept > 0, keep.size / jnp.maximum(kept, 1.0), 0.0)
    return jnp.where(keep, x * scale.astype(x.dtype), jnp.zeros((), x.dtype))
