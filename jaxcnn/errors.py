"""The errors that end a run or a command in a known way, one module below all that raise them.

Each says in its message what happened and what to do; ``jaxcnn.cli.run_main`` maps them to a
command's exit status (no traceback). They live here, with no jaxcnn import, so that the
command layer and the code that raises them need not import each other: the run folder raises
:class:`NothingToDo` and :class:`RunBusyError`, training :class:`TrainingDiverged` and
:class:`RunInterrupted`, the signal handler :class:`SignalStop`, the joining of several
processes :class:`DistributedError`, the checkpoint store :class:`DamagedCheckpointError`, the
data loaders :class:`DatasetUnavailableError`. Each is also importable from where it is raised
(``jaxcnn.runfolder.NothingToDo``, ``jaxcnn.train.TrainingDiverged``,
``jaxcnn.checkpoint.DamagedCheckpointError``, ``jaxcnn.data.DatasetUnavailableError``, ...); being
here, with nothing heavy imported, lets ``jaxcnn.cli`` name them without loading JAX or Orbax.
"""

from __future__ import annotations

import pathlib


class NothingToDo(Exception):
    """A resumed run already has the epochs asked for (or stopped early): nothing was trained or written."""


class RunBusyError(RuntimeError):
    """Another process is training into the run folder (it holds its lock)."""


class TrainingDiverged(RuntimeError):
    """The training loss went non-finite or above ``FitConfig.max_loss``, or the validation loss
    non-finite; ``summary`` is what was written."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run; the message says what was saved and how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class SignalStop(KeyboardInterrupt):
    """SIGINT or SIGTERM outside training: raised at once by the handler (``jaxcnn.signals``). A
    KeyboardInterrupt (a BaseException), so that no ``except Exception`` on the way turns it into
    another error."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class DistributedError(RuntimeError):
    """The processes could not be joined (the coordinator unreachable, a wrong process id)."""


class DamagedCheckpointError(RuntimeError):
    """A saved checkpoint cannot be read back whole. ``path``: its folder; ``reason``: what is wrong."""

    def __init__(self, path: pathlib.Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be had here (no network and no manually placed file).

    The message says how to get it. jaxcnn never falls back to another dataset
    silently: the caller decides (e.g. ``--dataset offline``).
    """
