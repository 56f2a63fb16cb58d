"""The project's oneDNN convolutions (``onednn_conv.cc``, built at install) as JAX primitives.

Three primitives, one per direction, each lowered on the CPU to an XLA FFI custom call of the
compiled module ``jaxcnn.kernels._onednn`` and elsewhere to XLA's own convolution
(:mod:`jaxcnn.kernels.xla`):

* ``conv``: the value, ``(N, H, W, C), (kh, kw, C, O) -> (N, H_out, W_out, O)``;
* ``conv_bwd_data``: the input gradient, ``(N, H_out, W_out, O), (kh, kw, C, O) -> (N, H, W, C)``;
* ``conv_bwd_weights``: the kernel gradient, ``(N, H, W, C), (N, H_out, W_out, O) -> (kh, kw, C, O)``.

Each is bilinear and the transposes of each are the other two, so ``jvp``, ``grad`` and derivatives
of any order stay on these kernels. Under ``vmap``, a batched input (or output gradient) with an
unbatched kernel folds into the batch axis; other batchings take XLA's convolution. float32 only:
:func:`jaxcnn.kernels.conv2d` sends every other dtype to XLA.

Loading: the module links oneDNN 3.2 from the ``onednn-cpu-gomp`` wheel; its ``libdnnl.so.3`` is
loaded by path first, so the module finds it wherever pip put the wheel. :func:`load` returns the
module or ``None``, with the reason in :func:`unavailable_reason`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import os
from typing import Optional

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxcnn.kernels import xla

_module = None
_reason: Optional[str] = None
_loaded = False


def _preload_libdnnl() -> None:
    """Load the wheel's ``libdnnl.so.3`` globally, so the module's dependency resolves to it."""
    try:
        dist = importlib.metadata.distribution("onednn-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        return  # the module's own RPATH, or the system's loader, may still find one
    for f in dist.files or ():
        if str(f).endswith("/libdnnl.so.3"):
            ctypes.CDLL(str(dist.locate_file(f)), mode=ctypes.RTLD_GLOBAL)
            return


def load():
    """The compiled module with its FFI targets registered, or ``None`` (then see
    :func:`unavailable_reason`). Loaded once per process."""
    global _module, _reason, _loaded
    if _loaded:
        return _module
    _loaded = True
    # oneDNN's OpenMP threads sleep between calls instead of spinning: XLA's own thread pool runs the
    # step's other operations on the same cores in between (measured: benchmarks/README.md). Read by
    # libgomp when it loads, so only where nothing loaded it before; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        _preload_libdnnl()
        module = importlib.import_module("jaxcnn.kernels._onednn")
    except ImportError as e:
        _reason = f"the compiled module did not build or load ({e})"
        return None
    except OSError as e:
        _reason = f"oneDNN's library did not load ({e})"
        return None
    for name, capsule in module.handlers().items():
        jax.ffi.register_ffi_target(f"jaxcnn_conv_{name}", capsule, platform="cpu")
    threads = os.environ.get("JAXCNN_ONEDNN_THREADS", "")
    module.set_threads(int(threads) if threads.isdigit() else (os.cpu_count() or 1))
    _module = module
    return module


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned ``None`` (``None`` once it has loaded, or before it is tried)."""
    return _reason


def set_threads(n: int) -> None:
    """oneDNN's OpenMP team size for later calls (default: ``JAXCNN_ONEDNN_THREADS``, else every core)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_threads: n must be a positive int, got {n!r}")
    module = load()
    if module is None:
        raise RuntimeError(f"set_threads: the oneDNN kernels are not available: {unavailable_reason()}")
    module.set_threads(n)


# --------------------------------------------------------------------------- the three primitives

_ATTRS = ("stride_h", "stride_w", "dilation_h", "dilation_w", "pad_top", "pad_bottom", "pad_left", "pad_right")


def _spec(p):
    """``(strides, pads, dilations)`` in :mod:`jaxcnn.kernels.xla`'s form from a primitive's params."""
    return dict(strides=(p["stride_h"], p["stride_w"]), dilations=(p["dilation_h"], p["dilation_w"]),
                pads=((p["pad_top"], p["pad_bottom"]), (p["pad_left"], p["pad_right"])))


def _attrs(p):
    """The FFI attributes: int64, as the handlers declare them."""
    return {k: np.int64(p[k]) for k in _ATTRS}


def _out_hw(h, w, k_h, k_w, p):
    eff_h, eff_w = (k_h - 1) * p["dilation_h"] + 1, (k_w - 1) * p["dilation_w"] + 1
    return ((h + p["pad_top"] + p["pad_bottom"] - eff_h) // p["stride_h"] + 1,
            (w + p["pad_left"] + p["pad_right"] - eff_w) // p["stride_w"] + 1)


conv_p = Primitive("jaxcnn_onednn_conv")
conv_bwd_data_p = Primitive("jaxcnn_onednn_conv_bwd_data")
conv_bwd_weights_p = Primitive("jaxcnn_onednn_conv_bwd_weights")


def _conv_abstract(x, w, **p):
    n, h, wd, _ = x.shape
    oh, ow = _out_hw(h, wd, w.shape[0], w.shape[1], p)
    return jax.core.ShapedArray((n, oh, ow, w.shape[3]), x.dtype)


def _bwd_data_abstract(g, w, *, in_h, in_w, **p):
    return jax.core.ShapedArray((g.shape[0], in_h, in_w, w.shape[2]), g.dtype)


def _bwd_weights_abstract(x, g, *, k_h, k_w, **p):
    return jax.core.ShapedArray((k_h, k_w, x.shape[3], g.shape[3]), x.dtype)


def _xla_conv(x, w, **p):
    return xla.fwd(x, w, **_spec(p))


def _xla_bwd_data(g, w, *, in_h, in_w, **p):
    return xla.bwd_data(g, w, x_shape=(g.shape[0], in_h, in_w, w.shape[2]), **_spec(p))


def _xla_bwd_weights(x, g, *, k_h, k_w, **p):
    return xla.bwd_weights(x, g, w_shape=(k_h, k_w, x.shape[3], g.shape[3]), **_spec(p))


for _prim, _abstract, _xla_impl, _target in (
    (conv_p, _conv_abstract, _xla_conv, "jaxcnn_conv_fwd"),
    (conv_bwd_data_p, _bwd_data_abstract, _xla_bwd_data, "jaxcnn_conv_bwd_data"),
    (conv_bwd_weights_p, _bwd_weights_abstract, _xla_bwd_weights, "jaxcnn_conv_bwd_weights"),
):
    _prim.def_abstract_eval(_abstract)
    _prim.def_impl(functools.partial(lambda prim, *args, **p: jax.jit(functools.partial(prim.bind, **p))(*args),
                                     _prim))
    _ffi = jax.ffi.ffi_lowering(_target)
    mlir.register_lowering(_prim, lambda ctx, *args, _ffi=_ffi, **p: _ffi(ctx, *args, **_attrs(p)), platform="cpu")
    mlir.register_lowering(_prim, mlir.lower_fun(_xla_impl, multiple_results=False))  # every other platform


def _ct(ct):
    """A cotangent as an array (a symbolic zero instantiated)."""
    return ad.instantiate_zeros(ct) if type(ct) is ad.Zero else ct


# conv(x, w): its transpose in x is the input gradient, in w the kernel gradient.
ad.defbilinear(
    conv_p,
    lambda ct, x, w, **p: conv_bwd_data_p.bind(_ct(ct), w, in_h=x.aval.shape[1], in_w=x.aval.shape[2], **p),
    lambda ct, x, w, **p: conv_bwd_weights_p.bind(x, _ct(ct), k_h=w.aval.shape[0], k_w=w.aval.shape[1], **p),
)
# bwd_data(g, w) (the value of x's gradient): its transposes are the value and the kernel gradient.
ad.defbilinear(
    conv_bwd_data_p,
    lambda ct, g, w, *, in_h, in_w, **p: conv_p.bind(_ct(ct), w, **p),
    lambda ct, g, w, *, in_h, in_w, **p: conv_bwd_weights_p.bind(_ct(ct), g, k_h=w.aval.shape[0],
                                                                 k_w=w.aval.shape[1], **p),
)
# bwd_weights(x, g): its transposes are the input gradient and the value.
ad.defbilinear(
    conv_bwd_weights_p,
    lambda ct, x, g, *, k_h, k_w, **p: conv_bwd_data_p.bind(g, _ct(ct), in_h=x.aval.shape[1],
                                                            in_w=x.aval.shape[2], **p),
    lambda ct, x, g, *, k_h, k_w, **p: conv_p.bind(x, _ct(ct), **p),
)


def _fold_batch(prim, xla_impl):
    """vmap: a batched first operand with an unbatched second folds into the batch axis (one kernel
    call); anything else takes XLA's convolution, vmapped."""

    def rule(args, dims, **p):
        a, b = args
        da, db = dims
        if da is not batching.not_mapped and db is batching.not_mapped and prim is not conv_bwd_weights_p:
            a = jax.numpy.moveaxis(a, da, 0)
            k, n = a.shape[:2]
            out = prim.bind(a.reshape(k * n, *a.shape[2:]), b, **p)
            return out.reshape(k, n, *out.shape[1:]), 0
        return jax.vmap(functools.partial(xla_impl, **p), in_axes=(da, db))(a, b), 0

    return rule


batching.primitive_batchers[conv_p] = _fold_batch(conv_p, _xla_conv)
batching.primitive_batchers[conv_bwd_data_p] = _fold_batch(conv_bwd_data_p, _xla_bwd_data)
batching.primitive_batchers[conv_bwd_weights_p] = _fold_batch(conv_bwd_weights_p, _xla_bwd_weights)


def conv2d(x, w, *, strides, pads, dilations):
    """The convolution on the oneDNN kernels: float32 ``x`` ``(N, H, W, C)`` and ``w`` ``(kh, kw, C, O)``,
    explicit ``pads`` ``((top, bottom), (left, right))``; the same result as
    :func:`jaxcnn.kernels.xla.fwd` up to float32 rounding.

    oneDNN wants the bottom / right padding that the output actually reaches; a stride that leaves
    input rows or columns unread (``(H + pads - eff_k) % stride``) gets its padding trimmed and, where
    that is not enough, its unread rows cut off the input first (their gradient is zero)."""
    if load() is None:
        raise RuntimeError(f"jaxcnn.kernels.onednn.conv2d: the oneDNN kernels are not available: {_reason}")
    p = dict(zip(_ATTRS, map(int, (*strides, *dilations, *pads[0], *pads[1]))))
    _, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    oh, ow = _out_hw(h, wd, kh, kw, p)
    # the bottom / right padding the last output actually reaches (may be negative: rows left unread)
    pb = (oh - 1) * p["stride_h"] + (kh - 1) * p["dilation_h"] + 1 - h - p["pad_top"]
    pr = (ow - 1) * p["stride_w"] + (kw - 1) * p["dilation_w"] + 1 - wd - p["pad_left"]
    if pb < 0 or pr < 0:
        x = x[:, :h + min(pb, 0), :wd + min(pr, 0)]
    p.update(pad_bottom=max(pb, 0), pad_right=max(pr, 0))
    return conv_p.bind(x, w, **p)


def impl_names(x_shape, w_shape, *, strides=(1, 1), pads=((1, 1), (1, 1)), dilations=(1, 1)) -> dict:
    """oneDNN's implementation of each direction for one shape (``brgconv:avx512_core``, ...), for the
    benchmarks' tables; ``{}`` where the kernels are not available."""
    module = load()
    if module is None:
        return {}
    n, h, w, c = x_shape
    kh, kw, _, o = w_shape
    p = dict(zip(_ATTRS, (*strides, *dilations, *pads[0], *pads[1])))
    oh, ow = _out_hw(h, w, kh, kw, p)
    rest = (oh, ow, *strides, *dilations, *pads[0], *pads[1])
    return {name: module.impl(kind, n, h, w, c, kh, kw, o, *rest)
            for kind, name in enumerate(("fwd", "bwd_data", "bwd_weights"))}


__all__ = ["conv2d", "conv_p", "conv_bwd_data_p", "conv_bwd_weights_p", "impl_names", "load", "set_threads",
           "unavailable_reason"]

del _prim, _abstract, _xla_impl, _target, _ffi
