"""A training run's folder, and the one module that knows its files.

Training writes through :class:`RunFolder`; inference, plots and experiments read through
it. Nothing else spells a file name of a run folder::

    <run>/config.json         what the run is: the model's spec, the data, the optimizer, the
                              loop's settings and the experiment's own (``jaxcnn.train.run_config``)
    <run>/history.json, .csv  one row per epoch (``HISTORY_FIELDS``)
    <run>/summary.json        the result, written when the run ends
    <run>/checkpoints/        Orbax: ``latest/<epoch>`` for resume, ``best/<epoch>`` for results
    <run>/tensorboard/        TensorBoard event files
    <run>/plots/              PNG figures (``curves.png``, ...)
    <run>/freeze_summary.txt  the Keras-like table of frozen layers (fine-tuning runs)

The rules of starting a run live here too (:meth:`RunFolder.prepare`): a folder that holds
checkpoints is never trained into afresh; a resumed run must have the saved config, except
for the settings in ``RESUMABLE``; ``overwrite`` sets the old run aside until the new one has
a checkpoint; one run at a time holds the folder's lock (:meth:`RunFolder.lock`). Records are
strict JSON, written atomically: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import pathlib
import shutil
import socket
import tempfile
from typing import Any

from jaxcnn.checkpoint import Checkpoints, DamagedCheckpointError, has_checkpoints  # noqa: F401 (for training)

CONFIG = "config.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
FREEZE_SUMMARY = "freeze_summary.txt"
#: The record files (what an export of a run copies, besides its plots).
RECORDS = (CONFIG, HISTORY_JSON, HISTORY_CSV, SUMMARY)

#: The columns of history.csv, in order (history.json rows hold these keys).
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "epoch_time_s", "images_per_s")
#: Everything a run writes here (what ``--overwrite`` sets aside).
RUN_FILES = (CHECKPOINTS, TENSORBOARD, PLOTS, *RECORDS, FREEZE_SUMMARY)
LOCK = ".lock"
PREVIOUS = ".previous"
#: config.json entries (dotted paths) that may change between a run and its resume.
RESUMABLE = frozenset({"fit.epochs", "fit.max_loss", "data.source.data_dir", "experiment.data_dir",
                       "data.source.stream", "experiment.stream"})


class RunBusyError(RuntimeError):
    """Another process is training into the run folder (it holds its lock)."""


class NothingToDo(Exception):
    """A resumed run already has the epochs asked for (or stopped early): nothing was trained or written."""


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_text(path: pathlib.Path, text: str) -> None:
    """Write via a temporary file and a rename: a crash never leaves half a record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as strict, indented JSON (non-finite floats as null), written atomically."""
    _write_text(pathlib.Path(path), json.dumps(_finite(obj), indent=1, allow_nan=False, default=str) + "\n")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, new: dict, *, allowed=RESUMABLE) -> list[str]:
    """``"key (old -> new)"`` for every dotted config entry that differs, except ``allowed``."""
    a, b = _flatten(saved), _flatten(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in allowed and a.get(k) != b.get(k)]


class RunFolder:
    """The folder of one training run (it need not exist yet).

    >>> run = RunFolder("checkpoints/cifar10-offline-demo")
    >>> run.read_config()["model"]["kind"], run.read_summary()["test_accuracy"]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ places

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.path.absolute() / CHECKPOINTS

    @property
    def tensorboard_dir(self) -> pathlib.Path:
        return self.path / TENSORBOARD

    @property
    def plots_dir(self) -> pathlib.Path:
        return self.path / PLOTS

    def plot_path(self, name: str = "curves.png") -> pathlib.Path:
        """Where the figure ``name`` of this run goes (``<run>/plots/<name>``)."""
        return self.plots_dir / name

    @property
    def freeze_summary_path(self) -> pathlib.Path:
        return self.path / FREEZE_SUMMARY

    def record_paths(self) -> list[pathlib.Path]:
        """The record files this run has (config, history, summary), for export."""
        return [self.path / name for name in RECORDS if (self.path / name).is_file()]

    # ------------------------------------------------------------------ reading

    def is_run(self) -> bool:
        """True when the folder holds a run's ``config.json``."""
        return (self.path / CONFIG).is_file()

    def has_checkpoints(self) -> bool:
        """True when the folder holds a saved epoch (latest or best)."""
        return has_checkpoints(self.checkpoint_dir)

    def _read_json(self, name: str, what: str):
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.path} is not {what}")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None

    def read_config(self) -> dict:
        """The run's ``config.json``; raises FileNotFoundError naming the file when there is none."""
        return self._read_json(CONFIG, "a training run folder")

    def read_history(self) -> list[dict]:
        """The per-epoch rows of ``history.json`` (FileNotFoundError when the run has none yet)."""
        history = self._read_json(HISTORY_JSON, "a run folder with a history")
        if not isinstance(history, list):
            raise ValueError(f"{self.path / HISTORY_JSON} must hold a list of per-epoch rows")
        return history

    def read_summary(self) -> dict:
        """``summary.json``, or ``{}`` while the run has not finished."""
        return self._read_json(SUMMARY, "a finished run") if (self.path / SUMMARY).is_file() else {}

    def checkpoints(self, *, keep: int = 3, read_only: bool = False) -> Checkpoints:
        """The run's Orbax store (``jaxcnn.checkpoint.Checkpoints``); close it, or use ``with``."""
        if read_only and not self.checkpoint_dir.is_dir():
            raise FileNotFoundError(f"{self.checkpoint_dir} not found: {self.path} holds no checkpoints")
        return Checkpoints(self.checkpoint_dir, keep=keep, read_only=read_only)

    # ------------------------------------------------------------------ starting a run

    def check_writable(self) -> None:
        """Raise ValueError naming the folder when a run cannot be written there: the path is a
        file, or the folder (or its nearest existing parent) does not take a new file."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"workdir={str(self.path)!r} is a file, not a folder")
        where = self.path
        while not where.exists():
            where = where.parent
        try:  # a real write: permission bits do not tell for root or a read-only filesystem
            fd, probe = tempfile.mkstemp(prefix=".jaxcnn-write-test-", dir=where)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"workdir={str(self.path)!r} cannot be written: {where} does not take a new file "
                             f"({e.strerror or e})") from None

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's lock while a run trains into it (``<run>/.lock``, an OS file lock).

        The lock is the process's own: it goes when the process ends, however it ends, so a
        lock left by a killed run is never in the way. Raises :class:`RunBusyError` naming the
        process that holds it.
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if created:
                    self.path.rmdir()
                raise RunBusyError(f"{self.path} is in use by another run ({holder}); wait for it to end, or "
                                   f"choose another workdir (nothing was changed)") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the lock is on the file that is there (not on one a releasing run just removed)
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        try:
            yield self
        finally:
            os.unlink(path)
            os.close(fd)  # closing releases the lock
            if created and not any(self.path.iterdir()):
                self.path.rmdir()  # a run that could not start leaves no empty folder behind

    def prepare(self, config: dict, *, resume: bool, overwrite: bool = False) -> list[str]:
        """The rules of starting a run here, applied before anything is written (hold the lock).

        * a folder with checkpoints is never trained into afresh: ``resume`` continues it,
          ``overwrite`` sets it aside (``<run>/.previous/``) until the new run has a first
          checkpoint (``commit``) — a new run that fails before that gets it back (``restore``);
        * ``resume`` needs a run to resume, with the saved config except ``RESUMABLE`` entries;
        * an ``--overwrite`` that was stopped before its first checkpoint left the old run set
          aside: it is brought back first.

        Returns notes for the user (e.g. "starting over").

        Raises:
          FileExistsError: checkpoints are there and neither ``resume`` nor ``overwrite``.
          FileNotFoundError: ``resume`` and the folder holds no run.
          ValueError: ``resume`` with a different config (the message lists the differences).
        """
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other")
        notes = []
        if (self.path / PREVIOUS).is_dir():
            if self.has_checkpoints():  # the new run had its first checkpoint: it is the run now
                shutil.rmtree(self.path / PREVIOUS)
            else:
                self.restore()
                notes.append(f"{self.path}: brought back the run that an interrupted --overwrite had set aside")
        if resume:
            if not self.is_run() and not self.has_checkpoints():
                raise FileNotFoundError(f"resume: {self.path} holds no run to resume (no config.json, no "
                                        f"checkpoints); start one without --resume")
            if self.is_run():
                diff = config_differences(self.read_config(), config)
                if diff:
                    raise ValueError("resume: the config differs from the run's saved config.json in "
                                     + ", ".join(diff) + "; only " + ", ".join(sorted(RESUMABLE))
                                     + " may change on resume (nothing was changed)")
            if not self.has_checkpoints():
                notes.append(f"{self.path}: the run was stopped before its first checkpoint; starting it over")
        elif self.has_checkpoints():
            if not overwrite:
                raise FileExistsError(f"{self.path} already holds checkpoints of a run; continue it with resume "
                                      f"(--resume), or choose another workdir (nothing was changed)")
            aside = self.path / PREVIOUS
            aside.mkdir()
            for name in RUN_FILES:
                if (self.path / name).exists():
                    os.replace(self.path / name, aside / name)
        return notes

    def commit(self) -> None:
        """The new run has a checkpoint: delete the run an ``overwrite`` set aside (if any)."""
        shutil.rmtree(self.path / PREVIOUS, ignore_errors=True)

    def restore(self) -> bool:
        """Put back the run an ``overwrite`` set aside, removing what the new run wrote; True if there was one."""
        aside = self.path / PREVIOUS
        if not aside.is_dir():
            return False
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if (aside / name).exists():
                os.replace(aside / name, target)
        aside.rmdir()
        return True

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG, config)

    # ------------------------------------------------------------------ writing

    def write_history(self, history: list[dict]) -> None:
        """``history.json`` (every key of every row) and ``history.csv`` (``HISTORY_FIELDS``)."""
        write_json(self.path / HISTORY_JSON, history)
        tmp = self.path / (HISTORY_CSV + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, self.path / HISTORY_CSV)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)

    def tensorboard(self):
        """A ``tensorboardX.SummaryWriter`` on ``<run>/tensorboard`` (close it, or use ``with``)."""
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.tensorboard_dir))


