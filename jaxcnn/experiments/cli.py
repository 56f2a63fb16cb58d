"""What the commands share: one-line errors and exit statuses, messages on stderr, workdir checks.

Every command runs its body through :func:`run_main`, which turns what a user can cause into
one line and an exit status, never a traceback (set ``JAXCNN_TRACEBACK=1`` to see one):

    0    done, or nothing to do (a resumed run that already has its epochs)
    1    the training diverged (the records and the last good checkpoints are kept)
    2    a bad setting, a folder that cannot be used, data or weights that cannot be had;
         checked before anything is created or loaded, and nothing was changed
    128+N  stopped by signal N (130: SIGINT, 143: SIGTERM) after saving where it was
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Optional

from jaxcnn.checkpoint import DamagedCheckpointError
from jaxcnn.data import DatasetUnavailableError
from jaxcnn.experiments.configs import PRECISIONS
from jaxcnn.runfolder import NothingToDo, RunBusyError, RunFolder
from jaxcnn.train import RunInterrupted, TrainingDiverged
from jaxcnn.train import distributed
from jaxcnn.train.distributed import DistributedError, Processes, initialize
from jaxcnn.train.cpu import backend_started, keep_host_memory, use_cpu_devices

#: Errors a user's input or machine causes: one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, PermissionError, RunBusyError,
               DatasetUnavailableError, DamagedCheckpointError, DistributedError)


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


def add_host_memory_flag(parser) -> None:
    """``--keep_host_memory`` (on) / ``--no-keep_host_memory``; applied by ``prepare_host``."""
    parser.add_argument("--keep_host_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the memory each step frees for the next one instead of handing it back to the "
                             "kernel (glibc's malloc; on by default: it spares the page faults of every step, 1.1-1.4x "
                             "faster on a 2-core VM: benchmarks/README.md); --no-keep_host_memory: glibc's default")


def prepare_host(args) -> None:
    """``--keep_host_memory``, before any use of JAX. In a process where JAX already runs (the
    tests call the CLIs in-process) the setting is left as it is."""
    if args.keep_host_memory and not backend_started():
        keep_host_memory()


def add_distributed_flags(parser) -> None:
    """``--distributed`` and how to reach the other processes (``jax.distributed.initialize``)."""
    parser.add_argument("--cpu_devices", type=int,
                        help="split the CPU into this many XLA devices, each taking a share of every batch (measured "
                             "on a 2-core VM in benchmarks/README.md); "
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


class _Stderr(logging.Handler):
    """A message per line on whatever ``sys.stderr`` is when it is written."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """jaxcnn's notes and warnings as plain lines on stderr."""
    logger = logging.getLogger("jaxcnn")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_main(body: Callable[[], int], *, user_errors: tuple = ()) -> int:
    """``body()``'s exit status, with the errors of ``USER_ERRORS + user_errors`` as one line each.

    In a run of several processes (``--distributed``), a process that fails tells the others,
    which stop at once with a line naming it and its error (``jaxcnn.train.distributed.end_all``),
    and leaves without waiting for them at JAX's shutdown barrier.
    """
    setup_logging()
    failure = {}

    def watched() -> int:
        try:
            return body()
        except BaseException as e:
            failure["why"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
            raise

    try:
        code = _run(watched, user_errors)
    except BaseException:
        if not distributed.joined():
            raise
        traceback.print_exc()  # not a user's error: the traceback, then every process stops
        code = 1
    if code != 0 and distributed.joined():  # (the body joins the processes: known only now)
        distributed.end_all(code, failure.get("why", f"exit status {code}"))
    return code


def _run(body: Callable[[], int], user_errors: tuple) -> int:
    try:
        return body()
    except NothingToDo as e:
        print(f"nothing to do: {e}")
        return 0
    except RunInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + int(e.signum)
    except TrainingDiverged as e:
        if os.environ.get("JAXCNN_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS + tuple(user_errors) as e:
        if os.environ.get("JAXCNN_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_workdir(workdir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """The workdir checks a command makes before it loads anything (ValueError / FileExistsError /
    FileNotFoundError, each naming the folder and the way out)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    folder = RunFolder(workdir)
    folder.check_writable()
    aside = folder.has_set_aside()  # an interrupted --overwrite: the run that starts deals with it
    if resume and not folder.is_run() and not folder.has_checkpoints() and not aside:
        raise FileNotFoundError(f"--resume: {workdir} holds no run to resume (no config.json, no checkpoints); "
                                f"start one without --resume")
    if (folder.has_checkpoints() or aside) and not (resume or overwrite):
        where = " (set aside in .previous/ by an interrupted --overwrite)" if aside else ""
        raise FileExistsError(f"{workdir} already holds checkpoints of a run{where}. Continue it with --resume, "
                              f"start afresh with --overwrite (the old run is deleted once the new one has saved its "
                              f"first checkpoint), or pass another --workdir. Nothing was changed.")


def path_flag(flag: str, value) -> Optional[pathlib.Path]:
    """A path-valued flag's folder or file, None when the flag was not given. An empty value is refused:
    it is no path (``--workdir ""`` once trained silently into the default folder)."""
    if value is None:
        return None
    if not str(value).strip():
        raise ValueError(f"{flag} {str(value)!r}: empty; name a path, or leave the flag out for its default")
    return pathlib.Path(value)


def check_run_flag(run: pathlib.Path) -> None:
    """A clearer error than a missing config.json for ``--run`` given a fine-tuning workdir (it holds
    ``phase1/`` and ``phase2/``, each a run folder)."""
    if not (run / "config.json").is_file() and (run / "phase2" / "config.json").is_file():
        raise FileNotFoundError(f"{run} is a fine-tuning run's folder; pass one of its phases: --run {run / 'phase2'} "
                                f"(or {run / 'phase1'})")
