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

The resume rule lives here too (:meth:`RunFolder.begin`): a folder that holds checkpoints is
never trained into afresh; a resumed run must have the saved config, except for the
settings in ``RESUMABLE``. Records are strict JSON: a non-finite number is written as
``null``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
from typing import Any, Optional

from jaxcnn.checkpoint import Checkpoints, has_checkpoints

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
#: config.json entries (dotted paths) that may change between a run and its resume.
RESUMABLE = frozenset({"fit.epochs", "data.source.data_dir", "experiment.data_dir"})


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

    # ------------------------------------------------------------------ writing

    def begin(self, config: dict, *, resume: bool) -> Optional[dict]:
        """Start or resume the run: the resume rule, then ``config.json``.

        A folder with checkpoints is refused unless ``resume``; a resumed run's config must
        equal the saved one except for ``RESUMABLE`` entries. Returns the saved config of a
        resumed run (None for a new one).

        Raises:
          FileExistsError: checkpoints are there and ``resume`` is False (nothing changed).
          ValueError: ``resume`` with a different config (the message lists the differences).
        """
        saved = None
        if self.has_checkpoints() and not resume:
            raise FileExistsError(f"{self.path} already holds checkpoints of a run; continue it with resume "
                                  f"(--resume), or choose another workdir (nothing was changed)")
        if resume and self.is_run():
            saved = self.read_config()
            diff = config_differences(saved, config)
            if diff:
                raise ValueError("resume: the config differs from the run's saved config.json in "
                                 + ", ".join(diff) + "; only " + ", ".join(sorted(RESUMABLE))
                                 + " may change on resume")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG, config)
        return saved

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

    def remove(self) -> None:
        """Delete what a run wrote here (checkpoints, TensorBoard logs, records, plots, freeze
        summary); other files in the folder stay."""
        for d in (self.checkpoint_dir, self.tensorboard_dir, self.plots_dir):
            shutil.rmtree(d, ignore_errors=True)
        for name in (*RECORDS, FREEZE_SUMMARY):
            (self.path / name).unlink(missing_ok=True)
