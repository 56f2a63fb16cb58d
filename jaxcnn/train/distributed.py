"""Beyond one machine: JAX's own multi-controller runtime, and what ``fit`` needs from it.

One process per host (or per GPU) runs the same program; ``jax.distributed.initialize`` joins
them, after which ``jax.devices()`` lists every device of every process and one ``jit`` step
runs over a mesh of all of them. Nothing here is a launcher or a collective of our own: the
processes agree through ``jax.experimental.multihost_utils`` (broadcasts and barriers over the
same runtime), and Orbax coordinates their checkpoints.

* :func:`initialize` — ``jax.distributed.initialize`` from flags, or from the environment JAX
  understands (TPU pods, SLURM, Open MPI), with CPU collectives over gloo and a heartbeat
  timeout: a process that dies stops the others after ``heartbeat_timeout_s`` with JAX's
  message ("... another task died ..."), instead of a hang.
* :class:`Processes` — who this process is (``index``, ``count``, ``primary``) and the few
  agreements ``fit`` needs: the same config on every process, decisions taken by process 0.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxcnn.data.core import Split


class DistributedError(RuntimeError):
    """The processes could not be joined (the coordinator unreachable, a wrong process id)."""


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, init_timeout_s: int = 120,
               heartbeat_timeout_s: int = 60) -> None:
    """Join this process to the others: ``jax.distributed.initialize`` with CPU collectives over gloo.

    Call it before anything else uses JAX. With all three of ``coordinator_address``
    (``host:port`` of process 0), ``num_processes`` and ``process_id`` None, JAX finds them in
    the environment (TPU pods, SLURM, Open MPI; ``JAX_COORDINATOR_ADDRESS`` for the address).

    Raises:
      DistributedError: bad arguments, or the coordinator was not reached in ``init_timeout_s``.
    """
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise DistributedError(f"num_processes={num_processes!r}; must be an int >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id!r}; must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce over gloo
    if coordinator_address and process_id not in (None, 0):
        # JAX ends a process that cannot register with the coordinator (a C++ abort): say it first, in words.
        _wait_for(coordinator_address, init_timeout_s, process_id, num_processes)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(init_timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except (RuntimeError, ValueError) as e:
        where = coordinator_address or "the coordinator the environment names"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join the processes through {where} (process {process_id} of "
                               f"{num_processes}) within {init_timeout_s} s: {first}") from None


def _wait_for(address: str, timeout_s: float, process_id, num_processes) -> None:
    """Return once ``host:port`` takes a TCP connection; DistributedError after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator_address={address!r}; must be host:port (process 0's)")
    deadline, reason = time.monotonic() + timeout_s, "no answer"
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            reason = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise DistributedError(f"could not join the processes through {address} (process {process_id} of "
                                   f"{num_processes}): process 0's coordinator did not answer within {timeout_s} s "
                                   f"({reason}). Start process 0 with the same --coordinator_address, or check the "
                                   f"address and the network")
        time.sleep(0.2)


class Processes:
    """This process among the processes of a run (one process: every method is free).

    ``fit`` asks it the few things the processes must agree on; process 0 decides and writes
    the run's records, every process takes part in the checkpoints.
    """

    def __init__(self):
        self.index, self.count = jax.process_index(), jax.process_count()

    @property
    def primary(self) -> bool:
        return self.index == 0

    def share(self, obj: Any) -> Any:
        """Process 0's ``obj`` (JSON-serialisable) on every process."""
        if self.count == 1:
            return obj
        from jax.experimental import multihost_utils

        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.primary else np.zeros(0, np.uint8)
        n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
        buf = data if self.primary else np.zeros(n, np.uint8)
        return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes().decode())

    def gather(self, value: int) -> list[int]:
        """Every process's integer ``value``, by process index."""
        if self.count == 1:
            return [int(value)]
        from jax.experimental import multihost_utils

        return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)]

    def gather_text(self, text: str, size: int = 1024) -> list[str]:
        """Every process's ``text`` (cut to ``size`` bytes), by process index."""
        if self.count == 1:
            return [text]
        from jax.experimental import multihost_utils

        buf = np.zeros(size, np.uint8)
        raw = text.encode()[:size]
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(self.count, size)
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]

    def on_primary(self, fn):
        """``fn()`` on process 0 only; its (JSON-serialisable) result on every process, or the
        error it raised (a setting, a folder) raised on every process."""
        if self.count == 1:
            return fn()
        from jaxcnn.data.core import DatasetUnavailableError
        from jaxcnn.runfolder import NothingToDo, RunBusyError

        errors = {c.__name__: c for c in (ValueError, TypeError, FileExistsError, FileNotFoundError,
                                           PermissionError, RunBusyError, NothingToDo, DatasetUnavailableError)}
        out = {"result": None, "error": None}
        if self.primary:
            try:
                out["result"] = fn()
            except Exception as e:  # every process stops with it (an error of another kind: as DistributedError)
                out["error"] = [type(e).__name__, str(e)]
        out = self.share(out)
        if out["error"]:
            name, message = out["error"]
            raise errors[name](message) if name in errors else DistributedError(f"process 0: {message}")
        return out["result"]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (a signal that reached one of them)."""
        return bool(flag) if self.count == 1 else any(self.gather(int(bool(flag))))

    def barrier(self, name: str) -> None:
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def check_same_config(self, config: dict) -> None:
        """Raise ValueError on every process when any process's ``config`` differs from process 0's,
        naming the process and the first differences."""
        if self.count == 1:
            return
        from jaxcnn.runfolder import config_differences

        reference = self.share(config)
        mine = config_differences(reference, json.loads(json.dumps(config)), allowed=frozenset())
        diffs = self.gather_text(", ".join(mine[:5]))
        bad = {i: d for i, d in enumerate(diffs) if d}
        if bad:
            raise ValueError("the processes were started with different settings: "
                             + "; ".join(f"process {i} differs from process 0 in {d}" for i, d in bad.items())
                             + ". Start every process with the same settings")


def load_in_turn(load, procs: Processes):
    """``load()`` on process 0 first, then on the others: a dataset that tfds prepares on first use
    is prepared once, by process 0, and read by the others (an error of process 0's stops all)."""
    if procs.count == 1:
        return load()
    first = {}
    procs.on_primary(lambda: first.setdefault("data", load()) and None)
    return first["data"] if procs.primary else load()


def shard(split: Split, index: int, count: int) -> Split:
    """Process ``index``'s rows of ``split``: every ``count``-th row from ``index`` on (in memory,
    or the files of a split read from disk)."""
    return split if count == 1 else split.shard(index, count)
