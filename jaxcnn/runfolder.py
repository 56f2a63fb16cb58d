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

A two-phase fine-tuning run is a folder of two run folders (:class:`FinetuneFolder`)::

    <ft>/phase1/, <ft>/phase2/   one run folder per phase; phase 2 holds the final model
    <ft>/summary.json            both phases' results

The rules of starting a run live here too (:meth:`RunFolder.prepare`): a folder that holds
checkpoints is never trained into afresh; a resumed run must have the saved config, except
for the settings in ``RESUMABLE`` (a resume on other devices than the last start's is said in a warning:
not bitwise); ``overwrite`` sets the old run aside (:class:`SetAside`,
``<run>/.previous/``, still on disk) until the new one has saved its first checkpoint; one run
at a time holds the folder's lock (:meth:`RunFolder.lock`). A command checks the same rules
before it loads anything (:meth:`RunFolder.check_start`, :meth:`FinetuneFolder.check_start`).
Records are strict JSON, written atomically: a non-finite number is written as ``null``.
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
from typing import Any, Optional

from jaxcnn.checkpoint import Checkpoints, DamagedCheckpointError, has_checkpoints  # noqa: F401 (for training)
from jaxcnn.errors import NothingToDo, RunBusyError  # noqa: F401 (raised here; NothingToDo by fit for a run)

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
#: The run folders of a fine-tuning run's folder (:class:`FinetuneFolder`), in order.
PHASES = ("phase1", "phase2")
#: Everything a run writes here (what ``--overwrite`` sets aside).
RUN_FILES = (CHECKPOINTS, TENSORBOARD, PLOTS, *RECORDS, FREEZE_SUMMARY)
LOCK = ".lock"
PREVIOUS = ".previous"  # an old run set aside by --overwrite (SetAside)
SETTING_ASIDE = ".previous.partial"
PUTTING_BACK = ".previous.returning"
UNFINISHED = ".unfinished-overwrite"  # what a killed --overwrite's new run wrote, kept by SetAside.recover
#: config.json entries (dotted paths) that may change between a run and its resume.
RESUMABLE = frozenset({"fit.epochs", "fit.max_loss", "data.source.data_dir", "experiment.data_dir",
                       "data.source.stream", "experiment.stream", "experiment.phase1_epochs",
                       "experiment.phase2_epochs", "experiment.phase2_frozen_layers", "devices"})
#: Patiences that may change on resume with the epochs when they equal them (``config_differences``).
FOLLOW_EPOCHS = ("fit.early_stopping_patience", "fit.plateau_patience")


#: The format of ``config.json`` this jaxcnn writes (``config["format_version"]``). Format 4 added the
#: soft targets ``fit.label_smoothing``, ``fit.mixup_alpha`` and ``fit.cutmix_alpha``, the learning-rate
#: schedule ``fit.lr_schedule`` and AdamW's ``optimizer.weight_decay`` (:func:`_from_format_3`: 0, 0, 0,
#: ``"plateau"`` and 0, what a format-3 run ran with; a format-4 config written before the last two
#: were added, on 2026-12-07, gets them the same way; so do ``fit.ema_decay``, 0: no weight EMA,
#: ``fit.flip_tta``, ``fit.grad_accum_steps`` and the cifar10 / finetune ``experiment.weight_decay``). Format 3 added
#: ``fit.warmup_epochs``, ``fit.precise_bn_batches``, ``fit.class_weight`` and the cifar10
#: experiment's ``bn_momentum``: :func:`_from_format_2` gives a format-2 run them at what it ran
#: with (0, 0, None and its model's momentum). Format 1 is format 2 without the field (runs recorded before
#: 2026-11-29). Format 0 is the early flat config (every setting at the top level, ``"model"`` a
#: name), written until the run-folder redesign of 2026-11-25 (a50606b): :func:`_from_format_0`
#: migrates it to format 2.
FORMAT_VERSION = 4

#: The ``fit`` keys format 4 added, at the value that is what a run without them ran with (a format-3
#: run, or a format-4 one written before the key was added to the format; ``flip_tta`` False: one view).
FORMAT_4_FIT = {"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "lr_schedule": "plateau",
                "ema_decay": 0.0, "flip_tta": False,
                "grad_accum_steps": 1}
#: The ``optimizer`` keys format 4 added, likewise (0: Adam).
FORMAT_4_OPTIMIZER = {"weight_decay": 0.0}
#: The ``experiment`` keys format 4 added to the cifar10 and finetune experiments' settings, likewise
#: (``weight_decay`` 0: Adam; ``jaxcnn.experiments.configs.ExperimentConfig``, ``FinetuneConfig``).
FORMAT_4_EXPERIMENT = {"weight_decay": 0.0}
_FORMAT_4_EXPERIMENTS = ("cifar10", "finetune")


class UnsupportedRunFormat(ValueError):
    """A run folder whose ``config.json`` this jaxcnn cannot read (the message says what to do)."""


def migrate_config(config: dict, path) -> dict:
    """``config`` in the format this jaxcnn reads (:data:`FORMAT_VERSION`), from any format it can
    migrate; :class:`UnsupportedRunFormat` naming ``path`` otherwise."""
    if not isinstance(config, dict):
        raise UnsupportedRunFormat(f"{path} is not a run's config (a JSON object)")
    version = config.get("format_version")
    if version == FORMAT_VERSION:
        return _with_format_4_schedule(config)
    if version is None and {"model", "data", "fit"} <= set(config):  # format 1: format 2, unversioned
        return _from_format_3(_from_format_2({"format_version": 2, **config}))
    if version is None and isinstance(config.get("model"), str) and "epochs" in config:  # format 0: flat
        return _from_format_3(_from_format_2(_from_format_0(config, path)))
    if version == 2:
        return _from_format_3(_from_format_2(config))
    if version == 3:
        return _from_format_3(config)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UnsupportedRunFormat(f"{path} is in run format {version}, newer than this jaxcnn reads "
                                   f"({FORMAT_VERSION}): upgrade jaxcnn to use this run")
    raise UnsupportedRunFormat(f"{path} is in a run format this jaxcnn cannot read ("
                               + (f"format {version!r}" if version is not None else
                                  "no format_version and no model / data / fit sections")
                               + f"; it reads format {FORMAT_VERSION} and migrates formats 0 to 3). Its records can "
                               f"still be read as JSON; to use the run, train it again with this jaxcnn")


def _from_format_2(config: dict) -> dict:
    """A format-2 config in format 3: ``fit.warmup_epochs`` 0, ``fit.precise_bn_batches`` 0 and
    ``fit.class_weight`` None (format 2 had none of them), and a cifar10 experiment's ``bn_momentum``: its model's (0.99, Keras',
    where the spec names none)."""
    new = {**config, "format_version": 3}
    if isinstance(config.get("fit"), dict):
        new["fit"] = {**config["fit"], "warmup_epochs": 0, "precise_bn_batches": 0, "class_weight": None}
    experiment, model = config.get("experiment"), config.get("model")
    if isinstance(experiment, dict) and experiment.get("name") == "cifar10" and "bn_momentum" not in experiment:
        momentum = model.get("bn_momentum", 0.99) if isinstance(model, dict) else 0.99
        new["experiment"] = {**experiment, "bn_momentum": momentum}
    return new


def _from_format_3(config: dict) -> dict:
    """A format-3 config in format 4: no label smoothing, mixup or cutmix (``fit.label_smoothing``,
    ``fit.mixup_alpha``, ``fit.cutmix_alpha`` 0), the seed's reduce-on-plateau (``fit.lr_schedule``
    ``"plateau"``), one view (``fit.flip_tta`` False) and Adam (``optimizer.weight_decay`` 0): format 3 had
    none of them."""
    new = {**config, "format_version": 4}
    if isinstance(config.get("fit"), dict):
        new["fit"] = {**config["fit"], **FORMAT_4_FIT}
    if isinstance(config.get("optimizer"), dict):
        new["optimizer"] = {**config["optimizer"], **FORMAT_4_OPTIMIZER}
    return _with_format_4_experiment(new)


def _with_format_4_experiment(config: dict) -> dict:
    """``config`` whose cifar10 or finetune ``experiment`` has every key of :data:`FORMAT_4_EXPERIMENT`
    (a run recorded before a key was added gets what it ran with)."""
    experiment = config.get("experiment")
    if (not isinstance(experiment, dict) or experiment.get("name") not in _FORMAT_4_EXPERIMENTS
            or set(FORMAT_4_EXPERIMENT) <= set(experiment)):
        return config
    return {**config, "experiment": {**FORMAT_4_EXPERIMENT, **experiment}}


def _with_format_4_schedule(config: dict) -> dict:
    """A format-4 config with every key of :data:`FORMAT_4_FIT` and :data:`FORMAT_4_OPTIMIZER`: one
    written before a key was added to the format gets what it ran with (the key's value there)."""
    fit, optimizer = config.get("fit"), config.get("optimizer")
    new = dict(config)
    if isinstance(fit, dict) and not set(FORMAT_4_FIT) <= set(fit):
        new["fit"] = {**FORMAT_4_FIT, **fit}
    if isinstance(optimizer, dict) and not set(FORMAT_4_OPTIMIZER) <= set(optimizer):
        new["optimizer"] = {**FORMAT_4_OPTIMIZER, **optimizer}
    return _with_format_4_experiment(new)


# Format 0's loop settings, copied into "fit" as they are.
_FLAT_FIT = ("epochs", "batch_size", "eval_batch_size", "seed", "early_stopping_patience", "plateau_factor",
             "plateau_patience", "plateau_min_delta", "min_lr", "keep_checkpoints")
_FLAT_AUGMENT = ("rotation", "width_shift", "height_shift", "horizontal_flip")
# What format 0 left unsaid, from the code that wrote it (jaxcnn up to a50606b): the offline set's
# classes, the two models' fixed constructor arguments, nearest-neighbour augmentation, the input
# preprocessing of each experiment, and no divergence limit.
_OFFLINE_CLASSES = ("disk", "ring", "square", "triangle", "plus", "crescent", "horizontal_stripes",
                    "vertical_stripes", "checkerboard", "dots")
_FLAT_MODELS = ("cifar_cnn", "finetune_classifier")


def _from_format_0(flat: dict, path) -> dict:
    """A format-0 (flat) config of an offline-data ``cifar_cnn`` or ``finetune_classifier``
    (ResNet50 backbone) run, in today's format; the flat keys that are not loop settings stay in
    ``"experiment"`` under their names."""
    def refuse(why: str):
        raise UnsupportedRunFormat(f"{path} is in run format 0 (the early flat config), but {why}: this jaxcnn "
                                   f"migrates format 0 only for offline-data {' / '.join(_FLAT_MODELS)} runs. Its "
                                   f"records can still be read as JSON")

    kind = flat["model"]
    if kind not in _FLAT_MODELS or (kind == "finetune_classifier" and flat.get("backbone") != "resnet50"):
        refuse(f"its model is {kind!r} (backbone {flat.get('backbone')!r})")
    if flat.get("dataset") != "offline":
        refuse(f"its dataset is {flat.get('dataset')!r}")
    needed = {*_FLAT_FIT, "augment", "learning_rate", "num_classes", "num_train", "num_val", "num_test",
              *(("widths", "dense_units", "conv_dropout", "conv_dropout_rate", "dense_dropout")
                if kind == "cifar_cnn" else ("hidden", "dropout", "image_size"))}
    missing = sorted(needed - set(flat))
    if missing:
        refuse(f"it lacks {', '.join(missing)}")
    if kind == "cifar_cnn":
        model = {"kind": "cifar_cnn", "num_classes": flat["num_classes"],
                 **{k: flat[k] for k in ("widths", "dense_units", "conv_dropout", "conv_dropout_rate",
                                         "dense_dropout")},
                 "dropblock_size": 3, "bn_momentum": 0.99, "bn_epsilon": 1e-3, "dtype": {"dtype": "float32"}}
    else:
        model = {"kind": "classifier", "backbone": {
            "kind": "resnet", "stage_sizes": [3, 4, 6, 3], "filters": [64, 128, 256, 512], "stem_filters": 64,
            "include_top": False, "pooling": "avg", "classes": 1000, "classifier_activation": "softmax",
            "dtype": {"dtype": "float32"}, "bn_momentum": 0.99, "bn_epsilon": 1.001e-5},
            "num_classes": flat["num_classes"], "dropout_rate": flat["dropout"], "hidden": flat["hidden"]}
    size = flat.get("image_size", 32)
    sizes = {k: flat[k] for k in ("num_train", "num_val", "num_test")}
    source = {"name": "offline", "data_dir": flat.get("data_dir"), "seed": flat["seed"], **sizes,
              **({"image_size": size} if "image_size" in flat else {})}
    augment = ({**{k: flat[k] for k in _FLAT_AUGMENT}, "interpolation": "nearest"} if flat["augment"] else None)
    used = {*_FLAT_FIT, "augment", "model", "num_classes", "backbone"} | (set(_FLAT_AUGMENT) if augment else set())
    name = "cifar10" if kind == "cifar_cnn" else "finetune"
    experiment = {"name": name, **{k: v for k, v in flat.items() if k not in used}}
    if kind == "finetune_classifier":
        experiment["model"] = flat["backbone"]
        del experiment["learning_rate"]  # the phase's rate: the optimizer's (phase1_lr / phase2_lr stay)
    return {
        "format_version": 2,
        "model": model,
        "data": {"name": "offline", "source": source, "image_shape": [size, size, 3],
                 "num_classes": flat["num_classes"], "class_names": list(_OFFLINE_CLASSES[:flat["num_classes"]]),
                 **sizes},
        "optimizer": {"learning_rate": flat["learning_rate"]},
        "fit": {**{k: flat[k] for k in _FLAT_FIT}, "augment": augment,
                "preprocess": "unit" if kind == "cifar_cnn" else "caffe", "max_loss": None},
        "experiment": {**experiment, "migrated_from": "format 0"},
    }


def _unchanged(notes: list[str]) -> str:
    """The end of a refusal: what this start changed before it refused (only ever a run put back)."""
    return "nothing was changed" if not notes else f"{'; '.join(notes)}; nothing else was changed"


#: What a folder holds when an interrupted ``--overwrite`` left its old run set aside.
_ASIDE = "set aside in .previous/ by an interrupted --overwrite"


def _refuse_start(path: pathlib.Path, *, resume: bool, overwrite: bool, resumable: bool, nothing: str,
                  holders: list[pathlib.Path], aside: bool) -> None:
    """The rules of starting a run in ``path`` (a run folder or a fine-tuning run's folder), as one
    error each, before anything is changed: ``resume`` and ``overwrite`` exclude each other;
    ``resume`` needs something to resume (``resumable``; else FileNotFoundError: the folder holds
    ``nothing``); checkpoints (in the run folders ``holders``, or in an old run that an
    interrupted ``--overwrite`` set ``aside``) are never trained over afresh without ``overwrite``
    (FileExistsError). The messages name the commands' flags; ``fit``'s arguments of the same
    names mean the same."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if resume and not resumable:
        raise FileNotFoundError(f"--resume: {path} holds no {nothing}; start one without --resume")
    if (holders or aside) and not (resume or overwrite):
        who = " and ".join(str(h) for h in holders) or str(path)
        raise FileExistsError(f"{who} already {'hold' if len(holders) > 1 else 'holds'} checkpoints of a run"
                              f"{f' ({_ASIDE})' if aside else ''}. Continue it with --resume, start afresh with "
                              f"--overwrite (the old run is deleted once the new one has saved its first checkpoint), "
                              f"or pass another --workdir. Nothing was changed.")


class SetAside:
    """An old run moved out of the way of a new one (``--overwrite``), inside its own folder.

    The entries ``names`` of ``folder`` (the old run's files) go one by one into
    ``.previous.partial/``, and one rename of that folder to ``.previous/`` ends the set-aside:
    only after it does the new run write anything. So a process killed at any point leaves one
    of three states, and :meth:`recover` (at the next start, under the folder's lock) finishes
    or undoes it without deleting anything of the old run:

    * ``.previous.partial/``: the set-aside was cut short; its entries are moved back;
    * ``.previous/``: deleted when the new run has a checkpoint (``has_new_run()``: it is the
      run now), else brought back;
    * ``.previous.returning/``: a put-back was cut short; it is finished.

    Bringing a run back never deletes a file this call did not write. :meth:`put_back` (the
    same call that set the run aside, its new run stopped before a checkpoint) removes the new
    run's entries first (every one of ``names`` in the folder is this call's), then renames
    ``.previous/`` to ``.previous.returning/`` and moves its entries back. :meth:`recover` (a
    later call) deletes nothing: an entry of the folder in the way of one coming back (what a
    killed new run wrote) is moved into ``.unfinished-overwrite/`` (``-2``, ... when taken) and
    the note says so; an entry with nothing of its name set aside stays where it is (an earlier
    jaxcnn set a run aside entry by entry, straight into ``.previous/``: a crash half way left
    the records in the folder).
    """

    def __init__(self, folder: str | os.PathLike, names, has_new_run):
        self.folder, self.names, self.has_new_run = pathlib.Path(folder), tuple(names), has_new_run
        self.moved = False  # this object set the old run aside (the new run's entries are then this call's)

    def _dir(self, name: str) -> pathlib.Path:
        return self.folder / name

    def pending(self) -> bool:
        """True when an old run is set aside here, or half set aside, or half put back."""
        return any(self._dir(n).is_dir() for n in (SETTING_ASIDE, PREVIOUS, PUTTING_BACK))

    def coming_back(self) -> Optional[pathlib.Path]:
        """The folder holding the old run's entries when :meth:`recover` will bring it back (its new run
        has no checkpoint), else None. (An entry that is not there was never set aside: it is in the folder.)"""
        if self.has_new_run():
            return None
        return next((self._dir(n) for n in (SETTING_ASIDE, PREVIOUS, PUTTING_BACK) if self._dir(n).is_dir()), None)

    def set_aside(self) -> bool:
        """Move the old run's entries into ``.previous/`` (see the class); False if it has none."""
        present = [n for n in self.names if os.path.lexists(self.folder / n)]
        if not present:
            return False
        partial = self._dir(SETTING_ASIDE)
        partial.mkdir()  # (recover first: a leftover one is refused here, not merged)
        for name in present:
            os.rename(self.folder / name, partial / name)
        os.rename(partial, self._dir(PREVIOUS))  # the set-aside's one moment: from here the new run may write
        self.moved = True
        return True

    def discard(self) -> None:
        """The new run has a checkpoint: delete the old run set aside (if any)."""
        if self._dir(PREVIOUS).is_dir():
            shutil.rmtree(self._dir(PREVIOUS))

    def put_back(self) -> bool:
        """Remove the new run's entries and put the old run back; True if there was one. Only after
        :meth:`set_aside` in this call (else False, and a run set aside earlier stays for
        :meth:`recover`, which deletes nothing)."""
        if not self.moved:
            return False
        aside, back = self._dir(PREVIOUS), self._dir(PUTTING_BACK)
        if aside.is_dir():
            for name in self.names:  # the new run's, written in this call (the old run's are all in .previous/)
                target = self.folder / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    target.unlink()
            os.rename(aside, back)
        if not back.is_dir():
            return False
        self._move_back(back)
        self.moved = False
        return True

    def _move_back(self, source: pathlib.Path, keep: Optional[list] = None) -> None:
        """Move ``source``'s entries into the folder. An entry in the way raises (``keep`` None: both
        stay), or with ``keep`` (a list) is moved into a fresh ``.unfinished-overwrite/`` folder,
        whose path is appended to ``keep``."""
        for entry in sorted(source.iterdir()):
            target = self.folder / entry.name
            if os.path.lexists(target):
                if keep is None:
                    raise FileExistsError(f"{target} is in the way of the old run's {entry}, which an interrupted "
                                          f"--overwrite had set aside; move one of them out of the way by hand")
                if not keep:
                    keep.append(self._unfinished())
                    keep[0].mkdir()
                os.rename(target, keep[0] / entry.name)
            os.rename(entry, target)
        source.rmdir()

    def _unfinished(self) -> pathlib.Path:
        """The first of ``.unfinished-overwrite``, ``-2``, ``-3``, ... that is not there."""
        path, n = self._dir(UNFINISHED), 2
        while os.path.lexists(path):
            path, n = self._dir(f"{UNFINISHED}-{n}"), n + 1
        return path

    def recover(self) -> Optional[str]:
        """Finish or undo what a killed ``--overwrite`` left (see the class), deleting nothing but an
        old run whose new run has a checkpoint; a note for the user, or None."""
        note, keep = None, []
        if self._dir(SETTING_ASIDE).is_dir():  # the new run never started
            self._move_back(self._dir(SETTING_ASIDE), keep)
            note = f"{self.folder}: put back the run that an interrupted --overwrite was setting aside"
        if self._dir(PREVIOUS).is_dir() and self.has_new_run():  # the new run had its first checkpoint
            self.discard()
        elif self._dir(PREVIOUS).is_dir() or self._dir(PUTTING_BACK).is_dir():
            if self._dir(PREVIOUS).is_dir():
                os.rename(self._dir(PREVIOUS), self._dir(PUTTING_BACK))
            self._move_back(self._dir(PUTTING_BACK), keep)
            note = f"{self.folder}: brought back the run that an interrupted --overwrite had set aside"
        if keep:
            note += (f"; what the interrupted run had written in its place ("
                     f"{', '.join(sorted(p.name for p in keep[0].iterdir()))}) is kept in {keep[0]}")
        return note


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


def nearest_existing(path: str | os.PathLike) -> pathlib.Path:
    """``path`` (absolute) if it exists, else its nearest parent that does (a link counts)."""
    where = pathlib.Path(path).absolute()
    while not os.path.lexists(where):
        where = where.parent
    return where


def write_refused(folder: pathlib.Path) -> Optional[str]:
    """Why the existing folder ``folder`` takes no new file (the OS's reason), or None when it does.
    A real write, removed again: permission bits do not tell for root or a read-only filesystem.
    (The callers raise their own error outside any ``except``: a read-only disk's EROFS in its
    context would otherwise be taken for a full disk's by ``jaxcnn.cli.disk_error``.)"""
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxcnn-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as strict, indented JSON (non-finite floats as null), written atomically."""
    _write_text(pathlib.Path(path), json.dumps(_finite(obj), indent=1, allow_nan=False, default=str) + "\n")


def reported_weights(tree: dict) -> tuple[Any, Any]:
    """``(params, batch_stats)`` that a checkpoint's tree (``jaxcnn.train.state_to_tree``: ``{"params",
    "batch_stats", ..., "ema"}``) reports: its ``"ema"``'s when it holds one (a run with
    ``fit.ema_decay``), else its own; ``batch_stats`` ``{}`` for a model without BatchNorm."""
    src = tree.get("ema") or tree
    return src["params"], src.get("batch_stats") or {}


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
    """``"key (old -> new)"`` for every dotted config entry that differs, except ``allowed``. With
    ``fit.epochs`` allowed, a patience (``FOLLOW_EPOCHS``) that equals the epochs in both (a fixed
    schedule: no early stop, no LR drop, as a fine-tuning phase runs) may follow them."""
    a, b = _flatten(saved), _flatten(new)
    follow = {k for k in FOLLOW_EPOCHS if "fit.epochs" in allowed
              and a.get(k) == a.get("fit.epochs") and b.get(k) == b.get("fit.epochs")}
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in allowed and k not in follow and a.get(k) != b.get(k)]


class RunFolder:
    """The folder of one training run (it need not exist yet).

    >>> run = RunFolder("checkpoints/cifar10-offline-demo")
    >>> run.read_config()["model"]["kind"], run.read_summary()["test_accuracy"]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._aside: Optional[SetAside] = None

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
        """The run's ``config.json`` in today's format (:func:`migrate_config`); raises
        FileNotFoundError naming the file when there is none, :class:`UnsupportedRunFormat` when
        it is in a format this jaxcnn cannot read."""
        return migrate_config(self._read_json(CONFIG, "a training run folder"), self.path / CONFIG)

    def config_to_resume(self) -> Optional[dict]:
        """The config a resume here continues (:meth:`read_config`), or None when there is none: that
        of the run an interrupted ``overwrite`` set aside when it is the one :meth:`prepare` will
        bring back (its new run saved no checkpoint), else the folder's ``config.json``."""
        back = self._set_aside().coming_back()
        if back is not None and (back / CONFIG).is_file():
            return RunFolder(back).read_config()
        return self.read_config() if self.is_run() else None

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
        where = nearest_existing(self.path)
        why = write_refused(where)
        if why is not None:
            raise ValueError(f"workdir={str(self.path)!r} cannot be written: {where} does not take a new file ({why})")

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

    def check_start(self, *, resume: bool, overwrite: bool) -> None:
        """The checks of starting a run here that need nothing loaded and change nothing (a
        command makes them before it loads its data; :meth:`prepare` makes them again): the
        folder can be written (:meth:`check_writable`), and the rules of :meth:`prepare` (an old
        run set aside by an interrupted ``overwrite`` counts as a run with checkpoints).

        Raises:
          ValueError: the folder cannot be written, or ``resume`` and ``overwrite`` together.
          FileNotFoundError: ``resume`` and the folder holds no run.
          FileExistsError: checkpoints are there and neither ``resume`` nor ``overwrite``.
        """
        self.check_writable()
        self._refuse_start(resume=resume, overwrite=overwrite)

    def _refuse_start(self, *, resume: bool, overwrite: bool) -> None:
        aside = self.has_set_aside()
        _refuse_start(self.path, resume=resume, overwrite=overwrite,
                      resumable=aside or self.is_run() or self.has_checkpoints(),
                      nothing="run to resume (no config.json, no checkpoints)",
                      holders=[self.path] * self.has_checkpoints(), aside=aside)

    def prepare(self, config: dict, *, resume: bool, overwrite: bool = False) -> list[str]:
        """The rules of starting a run here, applied before anything is written (hold the lock).

        * a folder with checkpoints is never trained into afresh: ``resume`` continues it,
          ``overwrite`` sets it aside (:class:`SetAside`, ``<run>/.previous/``) until the new run
          has saved its first checkpoint (``commit``) — a new run that fails before that gets it
          back (``restore``);
        * ``resume`` needs a run to resume, with the saved config except ``RESUMABLE`` entries;
        * an ``--overwrite`` that was stopped before its first checkpoint (or while setting the
          old run aside) left the old run set aside: it is brought back first (a start that is
          refused, by the rules of :meth:`check_start`, leaves it set aside).

        Returns notes for the user (e.g. "starting over").

        Raises:
          FileExistsError: checkpoints are there and neither ``resume`` nor ``overwrite``.
          FileNotFoundError: ``resume`` and the folder holds no run.
          ValueError: ``resume`` and ``overwrite``; ``resume`` with a different config (the
            message lists the differences).
        """
        self._refuse_start(resume=resume, overwrite=overwrite)
        note = self._set_aside().recover()
        notes = [note] if note else []
        if resume:
            if self.is_run():
                saved = self.read_config()
                if "fingerprint" not in (saved.get("data") or {}) and "fingerprint" in (config.get("data") or {}):
                    # a run recorded before data fingerprints: nothing to compare (this start records one)
                    config = {**config, "data": {k: v for k, v in config["data"].items() if k != "fingerprint"}}
                diff = config_differences(saved, config)
                if diff:
                    raise ValueError("resume: the config differs from the run's saved config.json in "
                                     + ", ".join(diff) + "; only " + ", ".join(sorted(RESUMABLE))
                                     + f" may change on resume ({_unchanged(notes)})")
                was, now = saved.get("devices"), config.get("devices")
                if was and now and was != now:
                    notes.append(f"{self.path}: the run trained on {was} and resumes on {now}: the same data order, "
                                 f"but not bitwise what it would have been on {was} (a batch's sums are split "
                                 f"differently); resume on {was} for that (on a CPU: --cpu_devices)")
            if not self.has_checkpoints():
                notes.append(f"{self.path}: the run was stopped before its first checkpoint; starting it over")
        elif self.has_checkpoints():  # (overwrite: refused above otherwise)
            self._set_aside().set_aside()
        return notes

    def _set_aside(self) -> SetAside:
        """The folder's one :class:`SetAside` (it knows whether this object set the old run aside)."""
        if self._aside is None:
            self._aside = SetAside(self.path, RUN_FILES, self.has_checkpoints)
        return self._aside

    def has_set_aside(self) -> bool:
        """True when an interrupted ``overwrite`` left a run set aside here (``prepare`` deals with it)."""
        return self._set_aside().pending()

    def commit(self) -> None:
        """The new run has a checkpoint: delete the run an ``overwrite`` set aside (if any)."""
        self._set_aside().discard()

    def restore(self) -> bool:
        """Put back the run that this object's ``prepare(overwrite=True)`` set aside, removing what the
        new run wrote; True if there was one (a run set aside by an earlier call is left to ``prepare``)."""
        return self._set_aside().put_back()

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` in this jaxcnn's format (``format_version`` is set when ``config``
        has none; ``jaxcnn.train.run_config`` sets it)."""
        if config.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"write_config: config has format_version={config.get('format_version')!r}; "
                             f"this jaxcnn writes {FORMAT_VERSION}")
        config = {"format_version": FORMAT_VERSION, **config}
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




class FinetuneFolder:
    """The folder of a two-phase fine-tuning run: a run folder per phase (:data:`PHASES`: phase 1
    trains the head on a frozen backbone, phase 2 fine-tunes, and holds the final model) and
    ``summary.json`` with both phases' results.

    >>> ft = FinetuneFolder("checkpoints/finetune-folder-default")
    >>> ft.final.path, ft.read_summary()["phase2"]["test_accuracy"]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def __repr__(self) -> str:
        return f"FinetuneFolder({str(self.path)!r})"

    def phase(self, n: int) -> RunFolder:
        """Phase ``n`` (1 or 2) as a run folder."""
        if n not in range(1, len(PHASES) + 1):
            raise ValueError(f"phase={n!r}; a fine-tuning run has phases 1 .. {len(PHASES)}")
        return RunFolder(self.path / PHASES[n - 1])

    @property
    def phases(self) -> list[RunFolder]:
        return [self.phase(n) for n in range(1, len(PHASES) + 1)]

    @property
    def final(self) -> RunFolder:
        """The phase that holds the final model (what to classify with)."""
        return self.phases[-1]

    def holds_phases(self) -> bool:
        """True when the folder is a fine-tuning run's (its final phase is a run), not a run itself."""
        return not RunFolder(self.path).is_run() and self.final.is_run()

    def read_summary(self) -> dict:
        """``summary.json`` (both phases' results), or ``{}`` while the run has not finished."""
        return RunFolder(self.path).read_summary()

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)

    def lock(self):
        """The lock of the whole run (``<ft>/.lock``; :meth:`RunFolder.lock`)."""
        return RunFolder(self.path).lock()

    def set_aside(self) -> SetAside:
        """The two phases and the summary as ``--overwrite`` sets them aside, one unit; the new run
        is the run once a phase has a checkpoint."""
        return SetAside(self.path, (*PHASES, SUMMARY), lambda: any(p.has_checkpoints() for p in self.phases))

    def config_to_resume(self) -> Optional[list]:
        """``[config, phase 2 started]`` of the run a resume here continues (the first phase's config
        that there is, :meth:`RunFolder.config_to_resume`; that of the run an interrupted
        ``overwrite`` set aside when it comes back), or None when there is none."""
        back = self.set_aside().coming_back()
        phases = FinetuneFolder(back).phases if back is not None and any(
            (back / name).exists() for name in PHASES) else self.phases
        configs = [p.config_to_resume() for p in phases]
        if not any(configs):
            return None
        return [next(c for c in configs if c), phases[1].is_run() or phases[1].has_checkpoints()]

    def check_start(self, *, resume: bool, overwrite: bool) -> None:
        """:meth:`RunFolder.check_start` for the two phases: each can be written, ``resume`` needs a
        phase that ran, and one with checkpoints (or a run an interrupted ``--overwrite`` set aside)
        is not trained into afresh without ``overwrite``. Changes nothing."""
        for phase in self.phases:
            phase.check_writable()
        aside = self.set_aside().pending()
        _refuse_start(self.path, resume=resume, overwrite=overwrite,
                      resumable=aside or any(p.is_run() or p.has_checkpoints() for p in self.phases),
                      nothing=f"fine-tuning run to resume (no {' or '.join(n + '/' for n in PHASES)} run)",
                      holders=[p.path for p in self.phases if p.has_checkpoints()], aside=aside)
