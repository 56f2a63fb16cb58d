"""Orbax storage of a run's checkpoints: latest (for resume) and best (for results).

A run folder (``jaxcnn.runfolder.RunFolder``) keeps its checkpoints in one directory with
two Orbax ``CheckpointManager`` sub-directories, kept apart on purpose::

    <checkpoints>/latest/<epoch>/         the last ``keep`` epochs (``LatestN``), for --resume
    <checkpoints>/best/<epoch>/           the epoch with the lowest validation loss, for results
    <checkpoints>/interrupted/<step>/     a run stopped mid-epoch by a signal (optimizer step);
                                          the folder exists only while it holds one: it is made
                                          by that save and removed once the epoch is saved

One manager with ``best_fn`` + ``max_to_keep`` would evict the latest steps when they are
not among the best and break resume (orbax issue 526); two managers cannot. Each
checkpoint has two items: ``state`` (a pytree of arrays) and ``meta`` (JSON, with a SHA-256
of the arrays). Saving is synchronous, so a donated state is never read after the step.

A checkpoint that cannot be read back whole — a truncated or bit-rotten array file, missing
or garbage metadata (a ``meta`` without the checksum every save writes), arrays that no longer
match their checksum — raises
:class:`DamagedCheckpointError` naming its folder; ``quarantine`` moves it aside (into
``<checkpoints>/damaged/``, never deleted) so that a resume can fall back to an older one.
Temporary folders of a save that was killed are removed when the store opens for writing.

This module stores trees; it knows nothing of what they hold (``jaxcnn.train`` turns a
``TrainState`` into one, ``jaxcnn.inference`` reads the variables back out).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcnn.errors import DamagedCheckpointError  # noqa: F401 (raised here; its home is light)

PyTree = Any
LATEST, BEST, INTERRUPTED = "latest", "best", "interrupted"
#: Files every complete checkpoint has (Orbax's metadata of the arrays, and the JSON item).
REQUIRED_FILES = ("state/_METADATA", "meta/metadata")
WHICH = (LATEST, BEST, INTERRUPTED)


def _epoch_dirs(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) \
        if directory.is_dir() else []


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """True when ``directory`` (a run's checkpoint directory) holds a saved epoch, latest or best."""
    return any(_epoch_dirs(pathlib.Path(directory) / which) for which in WHICH)


def _on_this_device(path: pathlib.Path) -> PyTree:
    """The saved tree's structure, shapes and dtypes, placed on this process's first device: a
    checkpoint written by any number of devices or processes restores on one."""
    absl = logging.getLogger("absl")  # it notes that a step's metadata file is not in the item's folder
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(path / "state").item_metadata
    finally:
        absl.setLevel(level)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def _name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tree_checksum(tree: PyTree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host copies).

    The path is the leaf's names joined by ``/`` and the leaves are taken in the order of those
    paths, so a tree restored without its target (named tuples read back as dicts) has the
    checksum of the tree that was saved.
    """
    leaves = {"/".join(_name(e) for e in path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}
    h = hashlib.sha256()
    for path in sorted(leaves):
        a = np.ascontiguousarray(np.asarray(leaves[path]))
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    """The innermost cause's first line: what the storage layer found wrong (file, byte range)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_failed_reads():
    """Orbax reads arrays in asyncio tasks. When one read fails, the error reaches us, but the
    other tasks' coroutines report theirs when Python collects them — hundreds of lines of
    tracebacks per damaged checkpoint. Those reports are dropped here (the error itself is
    raised to the caller); collection is forced before the hooks are put back. A failed read
    also leaves tensorstore callbacks that report "Event loop is closed" a moment later: a
    narrow filter for exactly those goes on ``sys.unraisablehook`` (others pass through) for
    ``_LATE_REPORTS_S`` seconds, after which it puts the previous hook back."""
    _drop_expired_filter()
    hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
    level = asyncio_log.level
    sys.unraisablehook = lambda unraisable: None
    asyncio_log.setLevel(logging.CRITICAL)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        gc.collect()
        sys.unraisablehook = hook if not failed or getattr(hook, "_jaxcnn_filter", False) else _closed_loop_filter(hook)
        asyncio_log.setLevel(level)


#: How long after a failed read the "Event loop is closed" reports are dropped.
_LATE_REPORTS_S = 30.0


def _closed_loop_filter(previous, seconds: float = _LATE_REPORTS_S):
    """``sys.unraisablehook`` that drops "Event loop is closed" for ``seconds``; the first report
    after that puts ``previous`` back (when this filter is still the hook) and passes on."""
    until = time.monotonic() + seconds

    def hook(unraisable):
        if time.monotonic() >= until:
            if sys.unraisablehook is hook:
                sys.unraisablehook = previous
            return previous(unraisable)
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxcnn_filter, hook._jaxcnn_previous, hook._jaxcnn_until = True, previous, until
    return hook


def _drop_expired_filter() -> None:
    """Put the hook back that an expired ``_closed_loop_filter`` wraps (when it is the hook)."""
    hook = sys.unraisablehook
    if getattr(hook, "_jaxcnn_filter", False) and time.monotonic() >= hook._jaxcnn_until:
        sys.unraisablehook = hook._jaxcnn_previous


def check_which(which: str, fn: str = "Checkpoints", allowed=WHICH) -> str:
    if which not in allowed:
        raise ValueError(f"{fn}: which={which!r}; allowed: {', '.join(map(repr, allowed))}")
    return which


class Checkpoints:
    """The two managers of a checkpoint directory.

    Args:
      directory: where ``latest/`` and ``best/`` live (``RunFolder.checkpoint_dir``).
      keep: how many latest epochs to keep (default 3); the best keeps one.
      read_only: open existing managers without creating directories (inference).

    ``save(epoch, tree, meta, best=...)`` writes the latest checkpoint and, when ``best``,
    replaces the best one. ``restore(which, target=...)`` returns ``(tree, meta)``.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpoints: keep={keep!r}; must be an int >= 1")
        self.directory = pathlib.Path(directory).absolute()
        self._read_only = read_only
        self._managers: dict[str, ocp.CheckpointManager] = {}
        self._keep = {LATEST: keep, BEST: 1, INTERRUPTED: 1}
        for which in WHICH:
            # interrupted/ is made only when a run is stopped mid-epoch (save_interrupted)
            if (read_only or which == INTERRUPTED) and not (self.directory / which).is_dir():
                continue
            self._open(which)

    def _open(self, which: str) -> ocp.CheckpointManager:
        # read_only=True logs warnings; create=False does not write. A read-only store is this
        # process's alone: in a multi-process run, process 0 restoring for its test results must
        # not wait at Orbax barriers for processes that are not restoring.
        local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=self._keep[which]),
            enable_async_checkpointing=False, create=not self._read_only,
            cleanup_tmp_directories=not self._read_only,
            **({"multiprocessing_options": local} if self._read_only else {}))
        self._managers[which] = ocp.CheckpointManager(self.directory / which, options=options,
                                                      item_names=("state", "meta"))
        return self._managers[which]

    def latest_epoch(self, which: str = LATEST) -> Optional[int]:
        """The newest saved epoch of ``which`` ("latest" or "best"), or None."""
        mgr = self._managers.get(check_which(which))
        return None if mgr is None else mgr.latest_step()

    def all_epochs(self, which: str = LATEST) -> list[int]:
        mgr = self._managers.get(check_which(which))
        return [] if mgr is None else sorted(mgr.all_steps())

    def save(self, epoch: int, tree: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``tree`` and JSON ``meta`` as epoch ``epoch`` (1-based) in latest, and in best if ``best``.

        ``save_interrupted`` keeps a mid-epoch state apart; the next ``save`` removes it.
        """
        if self._read_only:
            raise RuntimeError(f"Checkpoints: {self.directory} was opened read-only")
        meta = {**meta, "checksum": tree_checksum(tree)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        # Best before latest: a crash in between leaves latest at the previous epoch, so a resume
        # repeats this epoch (bitwise the same) instead of trusting a best that was never written.
        for which in (BEST, LATEST) if best else (LATEST,):
            mgr = self._managers[which]
            if int(epoch) in mgr.all_steps():  # written before a crash; a resumed run recomputes it identically
                continue
            mgr.save(int(epoch), args=args, force=True)
            mgr.wait_until_finished()
        self.clear(INTERRUPTED)

    def replace_best(self, epoch: int, tree: PyTree, meta: dict) -> None:
        """Make ``tree`` (epoch ``epoch``, read back from another checkpoint) the best checkpoint, in
        place of whatever best there is (a lost best replaced by an epoch the run still has)."""
        if self._read_only:
            raise RuntimeError(f"Checkpoints: {self.directory} was opened read-only")
        meta = {**{k: v for k, v in meta.items() if k != "checksum"}, "checksum": tree_checksum(tree)}
        self.clear(BEST)
        mgr = self._managers[BEST]
        mgr.save(int(epoch), args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                 force=True)
        mgr.wait_until_finished()

    def save_interrupted(self, step: int, tree: PyTree, meta: dict) -> None:
        """Save a mid-epoch ``tree`` (a run stopped by a signal) under its optimizer ``step``."""
        if self._read_only:
            raise RuntimeError(f"Checkpoints: {self.directory} was opened read-only")
        meta = {**meta, "checksum": tree_checksum(tree)}
        mgr = self._managers.get(INTERRUPTED) or self._open(INTERRUPTED)
        if int(step) not in mgr.all_steps():
            mgr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
            mgr.wait_until_finished()

    def clear(self, which: str) -> None:
        """Delete every checkpoint of ``which`` (the interrupted one, once its epoch is saved; its
        folder goes with it)."""
        mgr = self._managers.get(check_which(which))
        if mgr is None:
            return
        for step in mgr.all_steps():
            mgr.delete(step)
        if which == INTERRUPTED:
            mgr.close()
            del self._managers[which]
            if jax.process_index() == 0:
                with contextlib.suppress(OSError):  # (not empty: something not ours is in it; it stays)
                    (self.directory / which).rmdir()

    def restore(self, which: str = LATEST, epoch: Optional[int] = None, *, target: Optional[PyTree] = None
                ) -> tuple[PyTree, dict]:
        """``(tree, meta)`` of ``epoch`` (default: the newest) of ``which``, checked against its checksum.

        Args:
          target: the saved tree's structure as arrays or ``jax.ShapeDtypeStruct`` s: the
            restored arrays are placed like it (same shardings). None: the saved structure, on
            this process's first device (whatever devices or processes saved it).

        Raises:
          FileNotFoundError: ``which`` has no checkpoint (or not ``epoch``).
          DamagedCheckpointError: it cannot be read back whole (the message names the folder).
        """
        mgr = self._managers.get(check_which(which))
        epoch = (None if mgr is None else mgr.latest_step()) if epoch is None else int(epoch)
        if mgr is None or epoch is None or epoch not in mgr.all_steps():
            what = f"epoch {epoch} of" if epoch is not None else "any"
            raise FileNotFoundError(f"no {what} {which!r} checkpoint in {self.directory / which}")
        path = self.directory / which / str(epoch)
        for part in REQUIRED_FILES:
            if not (path / part).is_file():
                raise DamagedCheckpointError(path, f"{part} is missing")
        try:
            abstract = _on_this_device(path) if target is None else \
                jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            with _quiet_failed_reads():
                out = mgr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                meta=ocp.args.JsonRestore()))
            tree, meta = out["state"], out["meta"]
        except Exception as e:  # Orbax / tensorstore / JSON errors of every kind: the files are not whole
            raise DamagedCheckpointError(path, _reason(e)) from e
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(path, f"its meta is not a JSON object ({type(meta).__name__})")
        if not isinstance(meta.get("checksum"), str):  # every save writes it: without it nothing can be checked
            raise DamagedCheckpointError(path, "its meta has no checksum of the arrays (ill-formed metadata)")
        if tree_checksum(tree) != meta["checksum"]:
            raise DamagedCheckpointError(path, "its arrays do not match the checksum saved with them "
                                               "(bit rot, or a file overwritten or cut short)")
        return tree, dict(meta)

    def quarantine(self, which: str, epoch: int) -> pathlib.Path:
        """Move a damaged checkpoint to ``<checkpoints>/damaged/<which>-<epoch>`` (never deleted); returns it."""
        src = self.directory / check_which(which) / str(int(epoch))
        dest = self.directory / "damaged" / f"{which}-{int(epoch)}"
        n = 2
        while dest.exists():
            dest, n = dest.with_name(f"{which}-{int(epoch)}-{n}"), n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dest))
        if which in self._managers:
            self._managers[which].reload()
        return dest

    def reload(self) -> None:
        """Read the list of saved checkpoints from disk again (another process changed it)."""
        for m in self._managers.values():
            m.reload()

    def close(self) -> None:
        for m in self._managers.values():
            m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
