"""Settings of the host process for training on the CPU; each must come before JAX starts (before
the first array, ``jax.devices()`` or ``jax.distributed.initialize``), as the CLIs apply them.

* ``use_cpu_devices(n)``: the CPU split into ``n`` XLA devices, each taking a share of every batch.
* ``keep_host_memory()``: the step's freed buffers kept by the process for the next step instead
  of being handed back to the kernel and faulted in again.
"""

from __future__ import annotations

import ctypes
import platform

import jax

# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2 ** 31 - 1  # the largest value mallopt takes (an int): 2 GiB


def glibc_malloc() -> bool:
    """Whether this process allocates with glibc's ``malloc`` (Linux with glibc): where
    ``keep_host_memory`` applies."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def backend_started() -> bool:
    """Whether JAX's backends (its devices and threads) have started in this process."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def use_cpu_devices(count: int) -> None:
    """Split the host's CPU into ``count`` XLA devices; call it before JAX starts (before the first
    array, ``jax.devices()`` or ``jax.distributed.initialize``).

    The data-parallel step then splits each batch into ``count`` shards that XLA runs side by side,
    which can keep a multi-core CPU busier than one device's thread pool does (measured, with the
    batch sizes where it helps: ``benchmarks/README.md``). The arithmetic is the same program's
    (BatchNorm statistics over the whole batch); batch sizes must divide by the device count.
    GPUs are not affected.

    Raises:
      ValueError: ``count`` is not an int >= 1.
      RuntimeError: JAX's CPU backend already started with another device count.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"use_cpu_devices: count={count!r}; must be an int >= 1")
    if backend_started():
        have = len(jax.devices("cpu"))
        if have != count:
            raise RuntimeError(f"use_cpu_devices({count}): JAX already started with {have} CPU device(s); call it "
                               f"before the first use of JAX (or set JAX_NUM_CPU_DEVICES={count})")
        return
    jax.config.update("jax_num_cpu_devices", count)


def keep_host_memory() -> bool:
    """Keep the memory XLA frees on the host for its next step (glibc's ``malloc``); call it before
    JAX starts.

    XLA's CPU runtime allocates each call's buffers (a train step's temporaries: many MB) and
    frees them after it. glibc serves a block that large from a thread's arena with ``mmap`` and
    returns it with ``munmap``, so every step the kernel maps and zeroes those pages again (the
    page faults per step and the kernel's share of the CPU time, measured: ``benchmarks/README.md``).
    This sets ``M_ARENA_MAX=1`` (every thread
    allocates from the main heap, which can grow), ``M_MMAP_MAX=0`` (large blocks from the heap,
    not ``mmap``) and ``M_TRIM_THRESHOLD`` to 2 GiB (freed memory stays with the process), so the
    next step reuses the same pages, as TensorFlow's and PyTorch's caching allocators do. The
    process's resident memory then stays near its high-water mark until it exits. The gain is
    measured in ``benchmarks/README.md``. A process that alternates steps of very different sizes
    (batch 64 and 256 in turns) can still fault part of the time, when the heap's free blocks do
    not fit the next step; a training run's single batch size does not.

    Returns:
      True where applied (Linux with glibc); False elsewhere, where nothing is changed.

    Raises:
      RuntimeError: JAX already started (its threads keep the arenas they allocate from).
    """
    if not glibc_malloc():
        return False
    if backend_started():
        raise RuntimeError("keep_host_memory(): JAX already started; call it before the first use of JAX")
    libc = ctypes.CDLL("libc.so.6")
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"keep_host_memory(): glibc refused mallopt({param}, {value})")
    return True
