"""What the training commands share beyond ``jaxcnn.cli``: reading their flags (precision, folder
data, ``--max_loss``, host memory, several processes; added to a parser by ``jaxcnn.experiments.flags``,
importable from here too) and joining the processes.

The exit statuses, the one-line errors and the path flags of every command are ``jaxcnn.cli``'s
(its names are importable from here too); :func:`run_main` here is ``jaxcnn.cli.run_main`` for a
command that may run as several processes (``--distributed``): a process that fails ends the
others (``jaxcnn.train.distributed``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Optional

from jaxcnn import cli
from jaxcnn.cli import (USER_ERRORS, check_run_flag, check_workdir, disk_error, exit_process,  # noqa: F401
                        path_flag, setup_logging)
from jaxcnn.experiments.flags import (add_class_weight_flag, add_distributed_flags, add_folder_flags,  # noqa: F401
                                      add_host_memory_flag, add_max_loss_flag, add_precision_flag)
from jaxcnn.train import distributed
from jaxcnn.train.distributed import Processes, initialize
from jaxcnn.train.cpu import backend_started, keep_host_memory, use_cpu_devices


def with_class_weight(config, text: Optional[str]):
    """``config`` (an experiment config with a ``fit``) with ``--class_weight TEXT`` applied (None: as it is)."""
    if text is None:
        return config
    return dataclasses.replace(config, fit=dataclasses.replace(config.fit,
                                                               class_weight=None if text == "none" else text))


def max_loss_setting(text: Optional[str]):
    """``--max_loss TEXT`` as ``(given, value)``: ``(False, None)`` when not given, ``(True, None)``
    for ``none`` / ``inf`` (no limit), else ``(True, a number > 0)``; ValueError naming the value."""
    if text is None:
        return False, None
    if text.strip().lower() in ("none", "inf"):
        return True, None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--max_loss {text}: must be a number > 0, or none (no limit)")
    return True, value


def prepare_host(args) -> None:
    """``--keep_host_memory``, before any use of JAX. In a process where JAX already runs (the
    tests call the CLIs in-process) the setting is left as it is."""
    if args.keep_host_memory and not backend_started():
        keep_host_memory()


def join_processes(args) -> Processes:
    """``--keep_host_memory`` (``prepare_host``), ``--cpu_devices`` and ``jax.distributed.initialize``
    when ``--distributed`` (before any other use of JAX); this process."""
    prepare_host(args)
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise ValueError(f"--cpu_devices {args.cpu_devices}: must be >= 1")
        use_cpu_devices(args.cpu_devices)
    given = [f"--{k}" for k in ("coordinator_address", "num_processes", "process_id") if getattr(args, k) is not None]
    if not args.distributed:
        if given:
            raise ValueError(f"{', '.join(given)} need --distributed")
        return Processes()
    _native_stdout_to_stderr()  # gloo's connection notes are not the command's output
    initialize(args.coordinator_address, args.num_processes, args.process_id,
               init_timeout_s=args.init_timeout, heartbeat_timeout_s=args.heartbeat_timeout)
    procs = Processes()
    if not procs.primary:  # process 0 tells the story; the others speak only of errors (stderr)
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("jaxcnn").setLevel(logging.ERROR)
    return procs


def _native_stdout_to_stderr() -> None:
    """What native code (gloo, XLA) prints on the standard output goes to stderr; Python's
    ``print`` keeps the real standard output, so stdout holds the command's own lines only."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (a test's capture): nothing to split
        return
    sys.stdout.flush()
    python_out = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = os.fdopen(python_out, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")


def run_main(body: Callable[[], int], *, user_errors: tuple = ()) -> int:
    """``jaxcnn.cli.run_main`` for a training command: in a run of several processes, a process that
    fails ends the others (``jaxcnn.train.distributed.end_all``)."""
    return cli.run_main(body, user_errors=user_errors, peers=distributed)
