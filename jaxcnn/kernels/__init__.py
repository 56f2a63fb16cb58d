"""The one place that knows how a convolution is computed on which platform.

:func:`jaxcnn.layers.conv2d` checks its arguments and calls :func:`conv2d` here, which picks a
backend per call, at trace time:

* ``"onednn"``: the project's own oneDNN kernels (:mod:`jaxcnn.kernels.onednn`, C++ built when the
  package installs), registered with XLA through its FFI: float32 on the CPU, every direction
  (value, input gradient, kernel gradient), any stride, padding and dilation ``conv2d`` accepts.
  Lowered for another platform (GPU, TPU) they are XLA's convolution, so a program traced here
  still runs there on cuDNN / XLA.
* ``"xla"``: :func:`jax.lax.conv_general_dilated` (:mod:`jaxcnn.kernels.xla`).

The switch is the environment variable ``JAXCNN_KERNELS`` (read at each trace): ``auto``
(the default: ``onednn`` where the kernels are built and load, else ``xla``), ``onednn`` (an error
where they are not) or ``xla``; :func:`use` does the same for a block of code (export and Grad-CAM
trace XLA's path with it). Other dtypes than float32, an explicit ``precision`` and programs over
more than one device take XLA's path whatever the switch says (:func:`choose` tells why). Where
``auto`` finds no kernels, the first convolution says so in one line (a ``RuntimeWarning``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

from jaxcnn.kernels import xla

__all__ = ["BACKENDS", "available", "choose", "conv2d", "setting", "use"]

BACKENDS = ("auto", "onednn", "xla")
_local = threading.local()
_warned = False


def setting() -> str:
    """The backend asked for: :func:`use`'s inside its block, else ``JAXCNN_KERNELS`` (default ``auto``)."""
    value = getattr(_local, "backend", None) or os.environ.get("JAXCNN_KERNELS", "auto") or "auto"
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"JAXCNN_KERNELS must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Trace the convolutions of a block with ``backend`` (``"auto"``, ``"onednn"`` or ``"xla"``), in
    this thread; what was compiled before keeps the backend it was traced with."""
    if backend not in BACKENDS:
        raise ValueError(f"use: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    before = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = before


def available() -> Optional[str]:
    """``None`` where the oneDNN kernels load in this process, else why not (one line)."""
    from jaxcnn.kernels import onednn

    return None if onednn.load() is not None else onednn.unavailable_reason()


def choose(dtype, precision=None) -> tuple:
    """``(backend, why)``: the backend a convolution of ``dtype`` traced now takes, and the reason
    where it is not the one asked for (``None`` otherwise)."""
    want = setting()
    if want == "xla":
        return "xla", None
    missing = available()
    if missing is not None:
        if want == "onednn":
            raise RuntimeError(f"JAXCNN_KERNELS=onednn, but the oneDNN kernels are not available: {missing}; "
                               "reinstall jaxcnn with a C++ compiler (pip install -e .) or use JAXCNN_KERNELS=xla")
        return "xla", missing
    if jnp.dtype(dtype) != jnp.float32:
        return "xla", f"the kernels are float32 only (got {jnp.dtype(dtype).name})"
    if precision is not None:
        return "xla", f"precision={precision!r} is XLA's option"
    if jax.device_count() > 1:
        # an FFI call has no partitioning rule: under a multi-device mesh XLA would gather the batch
        return "xla", f"{jax.device_count()} devices (the kernels run on one)"
    return "onednn", None


def _note_missing(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"jaxcnn: convolutions run on XLA's path: the oneDNN kernels are not available ({why})",
                      RuntimeWarning, stacklevel=4)


def conv2d(x, w, *, strides, pads, dilations, precision=None):
    """The convolution of checked arguments (``jaxcnn.layers.conv2d`` checks them): ``x``
    ``(N, H, W, C)``, ``w`` ``(kh, kw, C, O)`` of the same dtype, ``strides`` and ``dilations``
    pairs of positive ints, ``pads`` ``((top, bottom), (left, right))``; returns
    ``(N, H_out, W_out, O)`` on the backend :func:`choose` picks."""
    backend, why = choose(x.dtype, precision)
    if backend == "onednn":
        from jaxcnn.kernels import onednn

        return onednn.conv2d(x, w, strides=tuple(strides), pads=tuple(map(tuple, pads)), dilations=tuple(dilations))
    if why is not None and setting() == "auto" and jax.default_backend() == "cpu" and available() is not None:
        _note_missing(why)
    return xla.fwd(x, w, strides=tuple(strides), pads=tuple(map(tuple, pads)), dilations=tuple(dilations),
                   precision=precision)
