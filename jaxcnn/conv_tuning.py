"""Convolutions chosen by measurement on the machine, as cuDNN's benchmark mode does.

For one stride-1 float32 convolution shape and one direction (``fwd`` the value, ``dx`` the input
gradient, ``dw`` the kernel gradient), :func:`choose` times the candidate formulations once (given
by the caller as jitted functions of random data of the shape), keeps the fastest and writes the
choice to a small JSON file, keyed by the machine (CPU model, instruction sets, core count, JAX
version) and the shape; the next trace of that shape reads it and times nothing.

Settings, read at each trace:

* ``JAXCNN_AUTOTUNE``: ``1`` times a shape not in the cache (at its first trace) and uses the
  cache; ``cache`` uses the cache only (a shape not in it gets the default formulation); ``0``
  (the default) turns all of this off: ``conv2d`` is what it was before autotuning, exactly. Off
  by default because on the one CPU measured (``benchmarks/README.md``) nothing chosen this way
  made the train step faster, and timings on a busy machine pick formulations by its noise.
* ``JAXCNN_AUTOTUNE_CACHE``: the cache file; default ``$XDG_CACHE_HOME/jaxcnn/conv_autotune.json``
  (``~/.cache/jaxcnn/conv_autotune.json`` without ``XDG_CACHE_HOME``).

A damaged cache (not JSON, or entries of the wrong types) is ignored with one warning and
rewritten at the next choice; choices of other machines stay in the file, unused.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax

FORMAT = 1
#: The instruction sets that change which formulation is fastest.
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
MODES = ("0", "1", "cache")
#: A candidate replaces the default only when it is at least this much faster (noise margin).
MARGIN = 0.9


def mode(value: Optional[str] = None) -> str:
    """The autotune setting: ``value`` if given, else ``$JAXCNN_AUTOTUNE`` (default ``0``, off)."""
    value = os.environ.get("JAXCNN_AUTOTUNE", "0") if value is None else value
    value = str(value).strip().lower()
    if value in ("off", "false", "no"):
        value = "0"
    if value in ("on", "true", "yes"):
        value = "1"
    if value not in MODES:
        raise ValueError(f"JAXCNN_AUTOTUNE must be one of 0, 1, cache, got {value!r}")
    return value


def cache_path() -> pathlib.Path:
    """``$JAXCNN_AUTOTUNE_CACHE``, else ``$XDG_CACHE_HOME/jaxcnn/conv_autotune.json``, else
    ``~/.cache/jaxcnn/conv_autotune.json``."""
    if os.environ.get("JAXCNN_AUTOTUNE_CACHE"):
        return pathlib.Path(os.environ["JAXCNN_AUTOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxcnn" / "conv_autotune.json"


def _cpu_info() -> tuple:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), sorted(flags & set(ISA_FLAGS))


def machine_key() -> str:
    """The machine a choice holds for: CPU model, its instruction sets, core count, JAX version."""
    model, flags = _cpu_info()
    return f"{model} [{' '.join(flags)}] cores={os.cpu_count()} jax={jax.__version__}"


def shape_key(direction: str, x_shape: Sequence[int], w_shape: Sequence[int], pads, dtype) -> str:
    """``fwd N,H,W,C kh,kw,C,C_out pads=t,b,l,r float32``."""
    (t, b), (l, r) = pads
    return (f"{direction} {','.join(map(str, x_shape))} {','.join(map(str, w_shape))} "
            f"pads={t},{b},{l},{r} {jax.numpy.dtype(dtype).name}")


def _set_aside(path: pathlib.Path, why: str) -> None:
    """One warning, and the damaged file renamed ``<name>.damaged`` (kept to look at, read no more):
    the next choice writes a new cache."""
    try:
        os.replace(path, path.with_name(path.name + ".damaged"))
    except OSError:
        pass
    warnings.warn(f"jaxcnn: the convolution autotune cache {path} is damaged ({why}); it is ignored (kept as "
                  f"{path.name}.damaged) and will be rewritten", RuntimeWarning, stacklevel=3)


def read_cache(path: Optional[pathlib.Path] = None, *, warn: bool = True) -> dict:
    """The cache file as ``{machine: {shape: {"choice": name, "ms": {name: ms}}}}``; ``{}`` when it is
    missing or damaged (then, with ``warn``, one warning and the file set aside)."""
    path = cache_path() if path is None else pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        if warn:
            warnings.warn(f"jaxcnn: could not read the convolution autotune cache {path}: {e}", RuntimeWarning,
                          stacklevel=2)
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        if warn:
            _set_aside(path, f"not JSON: {e}")
        return {}
    ok = (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("machines"), dict)
          and all(isinstance(m, dict) and all(isinstance(e, dict) and isinstance(e.get("choice"), str)
                                             for e in m.values()) for m in data["machines"].values()))
    if not ok:
        if warn:
            _set_aside(path, "not the expected {format, machines: {machine: {shape: {choice}}}}")
        return {}
    return data["machines"]


def lookup(shape: str, allowed: Sequence[str], path: Optional[pathlib.Path] = None) -> Optional[str]:
    """The cached choice for ``shape`` on this machine, if it names one of ``allowed``."""
    choice = read_cache(path).get(machine_key(), {}).get(shape, {}).get("choice")
    return choice if choice in allowed else None


def record(shape: str, choice: str, ms: Mapping[str, float], path: Optional[pathlib.Path] = None) -> None:
    """Adds one choice to the cache file (written whole to a temporary file, then renamed). A cache
    that cannot be written is left as it is with a warning: the choice still holds for this trace."""
    path = cache_path() if path is None else pathlib.Path(path)
    machines = read_cache(path, warn=False)
    machines.setdefault(machine_key(), {})[shape] = {"choice": choice, "ms": {k: round(v, 4) for k, v in ms.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "machines": machines}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"jaxcnn: could not write the convolution autotune cache {path}: {e}", RuntimeWarning,
                      stacklevel=2)


def time_candidates(candidates: Mapping[str, Callable[[], object]], *, rounds: int = 5,
                    min_seconds: float = 0.02) -> Dict[str, float]:
    """The median ms per call of each ``candidates[name]()`` (a call that blocks until done), the
    candidates taking turns round after round, after one untimed call each (the compilation)."""
    for f in candidates.values():
        f()
    calls = {}
    for name, f in candidates.items():  # enough calls per timing to last min_seconds
        t = time.perf_counter()
        f()
        calls[name] = max(1, min(20, int(min_seconds / max(time.perf_counter() - t, 1e-6))))
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, f in candidates.items():
            t = time.perf_counter()
            for _ in range(calls[name]):
                f()
            times[name].append((time.perf_counter() - t) / calls[name] * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def choose(shape: str, default: str, names: Sequence[str],
           make_timers: Callable[[], Mapping[str, Callable[[], object]]], *,
           setting: Optional[str] = None, path: Optional[pathlib.Path] = None) -> str:
    """The formulation (one of ``names``, ``default`` among them) to use for ``shape``: the cached
    choice of this machine if there is one, else (setting ``1``) the fastest of the timers that
    ``make_timers()`` returns (one per name, each a call on random data of the shape that blocks
    until done), timed now and cached, kept only when faster than ``default`` by the noise margin
    in the timing of all of them and again in a second timing of the two alone;
    with setting ``cache`` and no cached choice, or ``0``, ``default``."""
    setting = mode(setting)
    if setting == "0" or len(names) < 2:
        return default
    cached = lookup(shape, names, path)
    if cached is not None:
        return cached
    if setting == "cache":
        return default
    with jax.ensure_compile_time_eval():  # called while a jit traces: the data and the timing are outside it
        timers = make_timers()
        ms = time_candidates(timers)
        best = min(ms, key=ms.get)
        choice = default
        if ms[best] < MARGIN * ms[default]:  # confirmed by a second timing of the two, or not taken
            again = time_candidates({default: timers[default], best: timers[best]})
            ms.update({f"{name} again": v for name, v in again.items()})
            choice = best if again[best] < MARGIN * again[default] else default
    record(shape, choice, ms, path)
    return choice
