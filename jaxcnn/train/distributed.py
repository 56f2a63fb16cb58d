"""Beyond one machine: JAX's own multi-controller runtime, and what ``fit`` needs from it.

One process per host (or per GPU) runs the same program; ``jax.distributed.initialize`` joins
them, after which ``jax.devices()`` lists every device of every process and one ``jit`` step
runs over a mesh of all of them. Nothing here is a launcher or a collective of our own (but a
hello over TCP before JAX joins the processes): the processes agree through
``jax.experimental.multihost_utils`` (broadcasts and barriers over the same runtime), and Orbax
coordinates their checkpoints.

* :func:`initialize` — ``jax.distributed.initialize`` from flags, or from the environment JAX
  understands (TPU pods, SLURM, Open MPI), with CPU collectives over gloo and a heartbeat
  timeout. Given the flags, the processes first meet on the coordinator's port, so a process
  that never comes is named in one line instead of JAX's C++ abort.
* :func:`end_all` — a process that fails tells the others, which stop at once with one line
  naming it and its error (a watcher thread in each); a process that dies without a word (killed)
  stops the others after ``heartbeat_timeout_s`` with JAX's message ("... another task died ...").
* :class:`Processes` — who this process is (``index``, ``count``, ``primary``) and the few
  agreements ``fit`` needs: the same config on every process, decisions taken by process 0.

The data need no agreement: every process holds the whole split and computes the same global
order of each epoch (``jaxcnn.train.feed``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxcnn.data.core import DatasetUnavailableError
from jaxcnn.errors import DistributedError, NothingToDo, RunBusyError
from jaxcnn.runfolder import config_differences


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, init_timeout_s: int = 120,
               heartbeat_timeout_s: int = 60) -> None:
    """Join this process to the others: ``jax.distributed.initialize`` with CPU collectives over gloo.

    Call it before anything else uses JAX. With all three of ``coordinator_address``
    (``host:port`` of process 0), ``num_processes`` and ``process_id`` None, JAX finds them in
    the environment (TPU pods, SLURM, Open MPI; ``JAX_COORDINATOR_ADDRESS`` for the address).

    With an address given, the processes first meet over a plain TCP handshake on that port
    (:func:`_meet`): JAX ends a process whose peers never come with a C++ abort, so a missing
    process is found and named here first, in words. Once joined, a watcher thread ends this
    process with one line when another one reports a failure (:func:`end_all`).

    Raises:
      DistributedError: bad arguments, or the processes did not all arrive within ``init_timeout_s``.
    """
    global _joined
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise DistributedError(f"num_processes={num_processes!r}; must be an int >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id!r}; must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce over gloo
    if coordinator_address and process_id is not None and num_processes is not None and num_processes > 1:
        _meet(coordinator_address, num_processes, process_id, init_timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(init_timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except (RuntimeError, ValueError) as e:
        where = coordinator_address or "the coordinator the environment names"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join the processes through {where} (process {process_id} of "
                               f"{num_processes}) within {init_timeout_s} s: {first}") from None
    _joined = jax.process_count() > 1
    if _joined:
        threading.Thread(target=_watch_for_failures, name="jaxcnn-failure-watch", daemon=True).start()


def _meet(address: str, count: int, index: int, timeout_s: float) -> None:
    """Every process of the run meets on ``address``'s port before JAX joins them.

    Process 0 listens there, takes a hello (``jaxcnn <index> <count>``) from each of the others,
    answers ``go`` when all have come, and closes the port again for JAX's coordinator; the
    others connect (retrying) and wait for ``go``. A process missing after ``timeout_s``, a
    duplicate index or a different process count: :class:`DistributedError` naming them.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator_address={address!r}; must be host:port (process 0's)")
    deadline = time.monotonic() + timeout_s
    where = f"could not join the processes through {address} (process {index} of {count})"
    if index == 0:
        _host_meeting(int(port), count, deadline, where, timeout_s, address)
    else:
        _join_meeting(host.strip("[]"), int(port), count, index, deadline, where, timeout_s)


def _host_meeting(port: int, count: int, deadline: float, where: str, timeout_s: float, address: str) -> None:
    peers: dict[int, socket.socket] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("", port))
        except OSError as e:
            raise DistributedError(f"{where}: cannot listen on port {port} ({e.strerror or e})") from None
        server.listen(count)
        try:
            while len(peers) < count - 1:
                server.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    if time.monotonic() >= deadline:
                        missing = ", ".join(str(i) for i in range(1, count) if i not in peers)
                        raise DistributedError(
                            f"{where}: process{'es' if count - 1 - len(peers) > 1 else ''} {missing} did not "
                            f"arrive within {timeout_s} s. Start every process with --coordinator_address "
                            f"{address} --num_processes {count} and its own --process_id") from None
                    continue
                hello = _read_line(conn, deadline).split()
                if len(hello) != 3 or hello[0] != "jaxcnn" or not hello[1].isdigit() or not hello[2].isdigit():
                    conn.close()  # not one of ours (a port scan, a stray client): keep waiting
                    continue
                i, n = int(hello[1]), int(hello[2])
                problem = (f"process {i} was started with --num_processes {n}, process 0 with {count}" if n != count
                           else f"two processes were started with --process_id {i}" if i in peers else None)
                if problem:
                    conn.sendall(f"refused {problem}\n".encode())
                    conn.close()
                    raise DistributedError(f"{where}: {problem}")
                peers[i] = conn
            for conn in peers.values():
                conn.sendall(b"go\n")
            for conn in peers.values():  # they close first: the port's TIME_WAIT stays on their side
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    conn.recv(1)
                except OSError:
                    pass
        except BaseException:
            for conn in peers.values():
                conn.close()
            raise
        for conn in peers.values():
            conn.close()


def _join_meeting(host: str, port: int, count: int, index: int, deadline: float, where: str,
                  timeout_s: float) -> None:
    reason = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.2, min(1.0, deadline - time.monotonic()))) as c:
                c.sendall(f"jaxcnn {index} {count}\n".encode())
                answer = _read_line(c, deadline)
                if answer == "go":
                    return
                if answer.startswith("refused "):
                    raise DistributedError(f"{where}: {answer[len('refused '):]}")
                reason = "process 0 did not say go" if not answer else f"unexpected answer {answer[:40]!r}"
        except DistributedError:
            raise
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            raise DistributedError(f"{where}: process 0 did not gather the processes within {timeout_s} s "
                                   f"({reason}). Start process 0 with the same --coordinator_address, or check "
                                   f"the address and the network")
        time.sleep(0.2)


def _read_line(conn: socket.socket, deadline: float) -> str:
    """One short line from ``conn`` by ``deadline`` ("" if none came)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 256:
        conn.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = conn.recv(256)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# ---------------------------------------------------------------- a failure ends every process

_joined = False  # this process was joined to others by initialize()
_ending = threading.Event()  # this process is ending on an error of its own: the watcher stands back
_FAILED, _ACK, _LEAVING = "jaxcnn/failed/", "jaxcnn/ack/", "jaxcnn/leaving/"


def _client():
    from jax._src import distributed as jax_distributed  # JAX's coordination-service client (no public handle)

    return jax_distributed.global_state.client


def joined() -> bool:
    """True when :func:`initialize` joined this process to others (failures end every process)."""
    return _joined


def end_all(code: int, why: str, *, wait_s: float = 10.0) -> None:
    """End this process with status ``code`` after telling the others why (``why``: one line).

    Every other process's watcher prints ``error: process <i> failed: <why>`` and exits with the
    same status, within about a second, instead of waiting at a barrier for JAX's deadline. This
    process waits up to ``wait_s`` for them to have heard, then leaves without JAX's shutdown
    barrier (which would wait for them). Does not return.
    """
    _ending.set()
    procs = Processes()
    try:
        client = _client()
        client.key_value_set(f"{_FAILED}{procs.index}", f"{int(code)}\n{why}")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            heard = {k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(_ACK)}
            heard |= {k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(_FAILED)}
            if all(str(i) in heard for i in range(procs.count)):
                break
            time.sleep(0.1)
    except Exception:  # the coordinator is gone already: nobody left to tell
        pass
    _leave(code)


def _leave(code: int, wait_s: float = 5.0) -> None:
    """Exit with ``code``; process 0, which hosts JAX's coordination service, last: a process whose
    coordinator vanishes under it is aborted by JAX (a C++ stack trace instead of our line)."""
    try:
        client, me, count = _client(), jax.process_index(), jax.process_count()
        if me != 0:
            client.key_value_set(f"{_LEAVING}{me}", "1")
        else:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if len(client.key_value_dir_get(_LEAVING)) >= count - 1:
                    time.sleep(0.3)  # their exit itself
                    break
                time.sleep(0.05)
    except Exception:
        pass
    _exit(code)


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(int(code))


def _watch_for_failures(poll_s: float = 0.3) -> None:
    """Runs in a daemon thread of every joined process: when another process reports a failure
    (:func:`end_all`), say which and why in one line and end this one with its status."""
    index = jax.process_index()
    while True:
        time.sleep(poll_s)
        try:
            failed = [(k.rsplit("/", 1)[-1], v) for k, v in _client().key_value_dir_get(_FAILED)]
        except Exception:
            return  # the coordinator is gone (the run ended, or process 0 died: JAX's heartbeat says so)
        failed = [(int(i), v) for i, v in failed if i.isdigit() and int(i) != index]
        if not failed or _ending.is_set():
            continue
        if _ending.wait(2.0):  # this process is failing too (an error every process raises): it speaks itself
            continue
        i, value = min(failed)
        code, _, why = value.partition("\n")
        try:
            _client().key_value_set(f"{_ACK}{index}", "1")
        except Exception:
            pass
        print(f"error: process {i} failed, so process {index} stops too: {why}", file=sys.stderr)
        _leave(int(code) if code.isdigit() else 1)


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

    def barrier(self, name: str) -> None:
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def check_same_config(self, config: dict) -> None:
        """Raise ValueError on every process when any process's ``config`` differs from process 0's,
        naming the process and the first differences."""
        if self.count == 1:
            return
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

