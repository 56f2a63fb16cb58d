"""What the commands share: one-line errors and exit statuses, messages on stderr, workdir checks.

Every command runs its body through :func:`run_main`, which turns what a user can cause into
one line and an exit status, never a traceback (set ``JAXCNN_TRACEBACK=1`` to see one):

    0    done, or nothing to do (a resumed run that already has its epochs and its report)
    1    the training diverged (the records and the last good checkpoints are kept)
    2    a bad setting, a folder that cannot be used, data or weights that cannot be had
         (checked before anything is created or loaded, and nothing was changed); or a disk
         that is full or read-only (the records and checkpoints written before are kept)
    128+N  stopped by signal N (130: SIGINT, 143: SIGTERM) after saving where it was

Signals are caught for the whole command (``jaxcnn.train.signals``): the first SIGINT / SIGTERM
stops it where that is safe, and later ones are ignored until the process has ended.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import pathlib
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Optional

from jaxcnn.checkpoint import DamagedCheckpointError
from jaxcnn.data import DatasetUnavailableError
from jaxcnn.experiments.configs import PRECISIONS
from jaxcnn.runfolder import NothingToDo, RunBusyError, RunFolder
from jaxcnn.train import RunInterrupted, TrainingDiverged
from jaxcnn.train import distributed
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import DistributedError, Processes, initialize
from jaxcnn.train.cpu import backend_started, keep_host_memory, use_cpu_devices
from jaxcnn.train.signals import SignalStop, catching_signals, ignore_signals

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


def _no_thread_tracebacks(record: logging.LogRecord) -> bool:
    """Orbax logs the traceback of each failed writer thread (absl ``logging.exception``, asyncio's
    "Task exception was never retrieved"; 115 lines for a full disk) and raises the error in the
    main thread, where the command says it in one line."""
    return record.exc_info is None or bool(os.environ.get("JAXCNN_TRACEBACK"))


def _unraisable(previous):
    def hook(unraisable):
        # tensorstore completing a write after Orbax closed its event loop (another write failed)
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed" \
                and not os.environ.get("JAXCNN_TRACEBACK"):
            return
        previous(unraisable)

    hook.jaxcnn = True
    return hook


def setup_logging() -> None:
    """jaxcnn's notes and warnings as plain lines on stderr; no thread tracebacks from Orbax."""
    logger = logging.getLogger("jaxcnn")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for name in ("absl", "asyncio"):
        if _no_thread_tracebacks not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_no_thread_tracebacks)
    if not getattr(sys.unraisablehook, "jaxcnn", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
    if not os.environ.get("JAXCNN_TRACEBACK"):  # the writes Orbax had not started when another one failed
        warnings.filterwarnings("ignore", r"coroutine 'async_serialize_from_host\.", RuntimeWarning)


#: What a full or read-only disk is called (the errno, its name) by the OS and by tensorstore (Orbax).
DISK_ERRORS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS"}


def disk_error(e: BaseException) -> Optional[str]:
    """One line for an error (or its cause) that is a full or read-only disk: the folder and the
    cause; None for any other error. Orbax's writes fail in tensorstore, whose error is a
    ValueError naming the file and ``[os_error_code='28']``."""
    chain = []
    while e is not None and all(e is not c for c in chain):  # the error, its cause, its cause's ...
        chain.append(e)
        e = e.__cause__ or e.__context__
    code, path = None, None
    for e in chain:  # (a Python write names no file: the path may come from an error further down)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            code, path = code or e.errno, path or e.filename
        else:
            m = re.search(r"os_error_code='(\d+)'", str(e))
            if m and int(m.group(1)) in DISK_ERRORS:
                files = re.findall(r'"(/[^"]+)"', str(e))
                code, path = code or int(m.group(1)), path or (files[-1] if files else None)
    if code is None:
        return None
    where = _folder_of(path) if path else "the run's folder"
    return (f"cannot write in {where}: {os.strerror(code)} ({DISK_ERRORS[code]}). Free some space or "
            f"choose another folder; a run stopped by this continues with --resume")


def _folder_of(path) -> str:
    """The folder a failed write was in; for a checkpoint, the checkpoint's folder (above Orbax's
    temporary ``*.orbax-checkpoint-tmp`` parts)."""
    p = pathlib.Path(str(path))
    tmp = [q for q in [p, *p.parents] if ".orbax-checkpoint-tmp" in q.name]
    return str(tmp[-1].parent if tmp else p.parent)


def run_main(body: Callable[[], int], *, user_errors: tuple = ()) -> int:
    """``body()``'s exit status, with the errors of ``USER_ERRORS + user_errors`` and of a full or
    read-only disk as one line each; SIGINT / SIGTERM caught for the whole of it (``jaxcnn.train.signals``).

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

    with catching_signals():
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


def exit_process(code: int) -> None:
    """End a command's process with ``code``: from here on SIGINT and SIGTERM are ignored (a Ctrl-C
    in the interpreter's or JAX's shutdown raises where nothing can handle it)."""
    ignore_signals()
    sys.exit(code)


def _run(body: Callable[[], int], user_errors: tuple) -> int:
    try:
        return body()
    except NothingToDo as e:
        print(f"nothing to do: {e}")
        return 0
    except (RunInterrupted, SignalStop) as e:
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
        print(f"error: {disk_error(e) or e}", file=sys.stderr)  # (Orbax's full disk is a ValueError)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = disk_error(e)
        if line is None or os.environ.get("JAXCNN_TRACEBACK"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


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
