"""What the training commands share beyond ``jaxcnn.cli``: their flags (precision, folder data,
``--max_loss``, host memory, several processes) and joining the processes.

The exit statuses, the one-line errors and the path flags of every command are ``jaxcnn.cli``'s
(its names are importable from here too); :func:`run_main` here is ``jaxcnn.cli.run_main`` for a
command that may run as several processes (``--distributed``): a process that fails ends the
others (``jaxcnn.train.distributed``).
"""

from __future__ import annotations

import argparse
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
from jaxcnn.experiments.configs import PRECISIONS
from jaxcnn.train import distributed
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import Processes, initialize
from jaxcnn.train.cpu import backend_started, keep_host_memory, use_cpu_devices


def add_precision_flag(p) -> None:
    p.add_argument("--precision", choices=tuple(PRECISIONS),
                   help="the model's compute dtype (float32); bfloat16 keeps parameters, optimizer state, "
                        "BatchNorm statistics and the loss in float32 (measured: benchmarks/README.md)")


def add_folder_flags(p) -> None:
    """The flags of ``--dataset folder`` that every training command shares (``--data_dir`` and
    ``--image_size`` are the commands' own: they mean more there)."""
    p.add_argument("--val_fraction", type=float,
                   help="folder: fraction of the images for validation (0.1; a val/ subfolder takes precedence)")
    p.add_argument("--test_fraction", type=float,
                   help="folder: fraction of the images for the test (0.1; a test/ subfolder takes precedence)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="folder: decode each batch from disk in background threads (--stream) or all images into "
                        "memory first (--no-stream); default: stream when they would not fit in a quarter of memory")


def add_class_weight_flag(p) -> None:
    """``--class_weight none|balanced`` (read with :func:`with_class_weight`)."""
    p.add_argument("--class_weight", choices=("none", "balanced"),
                   help="balanced: weight each training example's loss by n / (K * n_c) of its class, so that an "
                        "imbalanced training set's small classes count as much as its large ones (Keras' class_weight); "
                        "default none")


def with_class_weight(config, text: Optional[str]):
    """``config`` (an experiment config with a ``fit``) with ``--class_weight TEXT`` applied (None: as it is)."""
    if text is None:
        return config
    return dataclasses.replace(config, fit=dataclasses.replace(config.fit,
                                                               class_weight=None if text == "none" else text))


def add_max_loss_flag(p) -> None:
    """``--max_loss`` (read with :func:`max_loss_setting`)."""
    p.add_argument("--max_loss", metavar="LOSS|none",
                   help=f"a training step's loss above this stops the run as diverged, exit 1 (default "
                        f"{FitConfig().max_loss:g}; "
                        "the loss of a uniform guess over K classes is ln K, 2.3 for 10); none: no limit. A loss "
                        "that is not finite, training or validation, always stops it")


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


def add_host_memory_flag(parser) -> None:
    """``--keep_host_memory`` (on) / ``--no-keep_host_memory``; applied by ``prepare_host``."""
    parser.add_argument("--keep_host_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the memory each step frees for the next one instead of handing it back to the "
                             "kernel (glibc's malloc; on by default: it spares the page faults of every step; "
                             "measured: benchmarks/README.md); --no-keep_host_memory: glibc's default")


def prepare_host(args) -> None:
    """``--keep_host_memory``, before any use of JAX. In a process where JAX already runs (the
    tests call the CLIs in-process) the setting is left as it is."""
    if args.keep_host_memory and not backend_started():
        keep_host_memory()


def add_distributed_flags(parser) -> None:
    """``--distributed`` and how to reach the other processes (``jax.distributed.initialize``)."""
    parser.add_argument("--cpu_devices", type=int,
                        help="split the CPU into this many XLA devices, each taking a share of every batch; on the "
                             "2-core CPUs measured (benchmarks/README.md) one device per core trained faster than one "
                             "device at batch 256, less or not at all faster at batch 64; "
                             "batch sizes must divide by it; no effect on a GPU")
    add_host_memory_flag(parser)
    g = parser.add_argument_group("several processes (one per host or per GPU; see the README)")
    g.add_argument("--distributed", action="store_true",
                   help="join the run's other processes (jax.distributed) before anything else; without the "
                        "three flags below, JAX finds them in the environment (TPU pods, SLURM, Open MPI)")
    g.add_argument("--coordinator_address", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, help="how many processes the run has")
    g.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes - 1")
    g.add_argument("--init_timeout", type=int, default=120,
                   help="seconds to wait at the start for the coordinator and the other processes (120)")
    g.add_argument("--heartbeat_timeout", type=int, default=60,
                   help="seconds without a sign of life after which a process counts as dead and the others "
                        "stop with a message (60)")


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
