"""What every command shares: one-line errors and exit statuses, messages on stderr, path flags.

Every command (``jaxcnn.predict``, the experiments' commands) runs its body through
:func:`run_main`, which turns what a user can cause into one line and an exit status, never a
traceback (set ``JAXCNN_TRACEBACK=1`` to see one):

    0    done, or nothing to do (a resumed run that already has its epochs and its report)
    1    the training diverged (the records and the last good checkpoints are kept)
    2    a bad setting, a folder that cannot be used, data or weights that cannot be had
         (checked before anything is created or loaded, and nothing was changed); or a disk
         that is full or read-only (the records and checkpoints written before are kept)
    128+N  stopped by signal N (130: SIGINT, 143: SIGTERM) after saving where it was

Signals are caught for the whole command (``jaxcnn.signals``): the first SIGINT / SIGTERM
stops it where that is safe, and later ones are ignored until the process has ended.

This layer sits below the commands and above what they raise (``jaxcnn.errors``); it knows no
training: a command of several processes passes them in (``run_main(..., peers=...)``).

It imports nothing heavy (no JAX, Orbax or TensorFlow; the run folder only inside the functions
that use it), nor may what a command imports to build its parser: a command parses its flags
before it imports what it runs, so that ``--help`` and a mistyped flag answer at once. Its parser
is :class:`ArgumentParser`: an argparse error is one line, with the nearest flag for one that
does not exist.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import pathlib
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Optional, Protocol

from jaxcnn.errors import (DamagedCheckpointError, DatasetUnavailableError, DistributedError, NothingToDo, RunBusyError,
                           RunInterrupted, SignalStop, TrainingDiverged)
from jaxcnn.signals import catching_signals, ignore_signals

#: Errors a user's input or machine causes: one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, PermissionError, RunBusyError,
               DatasetUnavailableError, DamagedCheckpointError, DistributedError)


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
    # Pillow's DecompressionBombWarning: jaxcnn.data.folder.decode_image names the file and its size in one line
    warnings.filterwarnings("ignore", r"Image size \(\d+ pixels\) exceeds limit of \d+ pixels, could be "
                                      r"decompression bomb")


#: What a full or read-only disk is called (the errno, its name) by the OS and by tensorstore (Orbax).
DISK_ERRORS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS"}


def disk_error(e: BaseException, *, folder=None, resume: bool = True) -> Optional[str]:
    """One line for an error (or its cause) that is a full or read-only disk: the folder and the
    cause; None for any other error. Orbax's writes fail in tensorstore, whose error is a
    ValueError naming the file and ``[os_error_code='28']``.

    ``folder``: the folder to name when no error in the chain names a file (a Python write names
    none; default "the run's folder"); ``resume``: the line says that a run stopped by this
    continues with ``--resume`` (False for a command that has no ``--resume``: the export)."""
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
    where = _folder_of(path) if path else (folder or "the run's folder")
    return (f"cannot write in {where}: {os.strerror(code)} ({DISK_ERRORS[code]}). Free some space or "
            f"choose another folder" + ("; a run stopped by this continues with --resume" if resume else ""))


def _folder_of(path) -> str:
    """The folder a failed write was in; for a checkpoint, the checkpoint's folder (above Orbax's
    temporary ``*.orbax-checkpoint-tmp`` parts)."""
    p = pathlib.Path(str(path))
    tmp = [q for q in [p, *p.parents] if ".orbax-checkpoint-tmp" in q.name]
    return str(tmp[-1].parent if tmp else p.parent)


class Peers(Protocol):
    """The other processes of a run of several (``jaxcnn.train.distributed`` is one)."""

    def joined(self) -> bool:
        """True when this process was joined to others."""

    def end_all(self, code: int, why: str) -> None:
        """End this process with ``code`` after telling the others ``why`` (one line); does not return."""


def run_main(body: Callable[[], int], *, user_errors: tuple = (), peers: Optional[Peers] = None) -> int:
    """``body()``'s exit status, with the errors of ``USER_ERRORS + user_errors`` and of a full or
    read-only disk as one line each; SIGINT / SIGTERM caught for the whole of it (``jaxcnn.signals``).

    ``peers``: in a run of several processes (``--distributed``: ``jaxcnn.train.distributed``), a
    process that fails tells the others, which stop at once with a line naming it and its error
    (``peers.end_all``), and leaves without waiting for them at JAX's shutdown barrier.
    """
    setup_logging()
    failure = {}

    def watched() -> int:
        try:
            return body()
        except BaseException as e:
            failure["why"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
            raise

    joined = peers.joined if peers is not None else (lambda: False)
    with catching_signals():
        try:
            code = _run(watched, user_errors)
        except BaseException:
            if not joined():
                raise
            traceback.print_exc()  # not a user's error: the traceback, then every process stops
            code = 1
    if code != 0 and joined():  # (the body joins the processes: known only now)
        peers.end_all(code, failure.get("why", f"exit status {code}"))
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
    """The workdir checks a training command makes before it loads anything
    (``jaxcnn.runfolder.RunFolder.check_start``: each error names the folder and the way out)."""
    from jaxcnn.runfolder import RunFolder  # (it loads Orbax: not before the flags are parsed)

    RunFolder(workdir).check_start(resume=resume, overwrite=overwrite)


def path_flag(flag: str, value, *, required: bool = False) -> Optional[pathlib.Path]:
    """A path-valued flag's folder or file, None when the flag was not given. An empty value is refused:
    it is no path (``--workdir ""`` once trained silently into the default folder). ``required``: the
    flag has no default to fall back on (the message does not offer one)."""
    if value is None:
        return None
    if not str(value).strip():
        raise ValueError(f"{flag} {str(value)!r}: empty; name a path"
                         + ("" if required else ", or leave the flag out for its default"))
    return pathlib.Path(value)


def check_run_flag(run: pathlib.Path) -> None:
    """A clearer error than a missing config.json for ``--run`` given a fine-tuning run's folder
    (``jaxcnn.runfolder.FinetuneFolder``: a run folder per phase)."""
    from jaxcnn.runfolder import FinetuneFolder  # (it loads Orbax: not before the flags are parsed)

    folder = FinetuneFolder(run)
    if folder.holds_phases():
        raise FileNotFoundError(f"{run} is a fine-tuning run's folder; pass one of its phases: --run "
                                f"{folder.final.path} (or {folder.phase(1).path})")


def description(doc: str) -> str:
    """A command's ``--help`` description: the first paragraph of its module's docstring, one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line on stderr, exit 2, instead of the whole usage:
    ``error: MESSAGE (see PROG --help)``. A flag that does not exist is named with the nearest one
    there is (``--epoch``: ``did you mean --epochs?``). No flag is taken abbreviated
    (``allow_abbrev=False`` unless told otherwise: ``--epoch 3`` is no ``--epochs 3``)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return namespace

    def _unrecognized(self, extras: list) -> str:
        # the values after an unknown flag are left over too: name the flags ("--epoch 3": --epoch)
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-") and not _is_number(a)] or extras
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        near = {f: (difflib.get_close_matches(f, known, n=1) if f.startswith("-") else []) for f in flags}
        if len(flags) == 1:
            return f"unrecognized argument {flags[0]}" + "".join(f"; did you mean {n}?" for n in near[flags[0]])
        return "unrecognized arguments " + ", ".join(f + "".join(f" (did you mean {n}?)" for n in near[f])
                                                     for f in flags)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
