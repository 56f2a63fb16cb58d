"""Orbax storage of a run's checkpoints: latest (for resume) and best (for results).

A run folder (``jaxcnn.runfolder.RunFolder``) keeps its checkpoints in one directory with
two Orbax ``CheckpointManager`` sub-directories, kept apart on purpose::

    <checkpoints>/latest/<epoch>/   the last ``keep`` epochs (``LatestN``), for --resume
    <checkpoints>/best/<epoch>/     the epoch with the lowest validation loss, for results

One manager with ``best_fn`` + ``max_to_keep`` would evict the latest steps when they are
not among the best and break resume (orbax issue 526); two managers cannot. Each
checkpoint has two items: ``state`` (a pytree of arrays) and ``meta`` (JSON). Saving is
synchronous, so a donated state is never read after the step.

This module stores trees; it knows nothing of what they hold (``jaxcnn.train`` turns a
``TrainState`` into one, ``jaxcnn.inference`` reads the variables back out).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any
LATEST, BEST = "latest", "best"
WHICH = (LATEST, BEST)


def _epoch_dirs(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) \
        if directory.is_dir() else []


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """True when ``directory`` (a run's checkpoint directory) holds a saved epoch, latest or best."""
    return any(_epoch_dirs(pathlib.Path(directory) / which) for which in WHICH)


def check_which(which: str, fn: str = "Checkpoints") -> str:
    if which not in WHICH:
        raise ValueError(f"{fn}: which={which!r}; allowed: {LATEST!r}, {BEST!r}")
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
        for which, n in ((LATEST, keep), (BEST, 1)):
            if read_only and not (self.directory / which).is_dir():
                continue
            options = ocp.CheckpointManagerOptions(  # read_only=True logs warnings; create=False does not write
                preservation_policy=ocp.checkpoint_managers.LatestN(n=n),
                enable_async_checkpointing=False, create=not read_only)
            self._managers[which] = ocp.CheckpointManager(self.directory / which, options=options,
                                                          item_names=("state", "meta"))

    def latest_epoch(self, which: str = LATEST) -> Optional[int]:
        """The newest saved epoch of ``which`` ("latest" or "best"), or None."""
        mgr = self._managers.get(check_which(which))
        return None if mgr is None else mgr.latest_step()

    def all_epochs(self, which: str = LATEST) -> list[int]:
        mgr = self._managers.get(check_which(which))
        return [] if mgr is None else sorted(mgr.all_steps())

    def save(self, epoch: int, tree: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``tree`` and JSON ``meta`` as epoch ``epoch`` (1-based) in latest, and in best if ``best``."""
        if self._read_only:
            raise RuntimeError(f"Checkpoints: {self.directory} was opened read-only")
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        # Best before latest: a crash in between leaves latest at the previous epoch, so a resume
        # repeats this epoch (bitwise the same) instead of trusting a best that was never written.
        for which in (BEST, LATEST) if best else (LATEST,):
            mgr = self._managers[which]
            if int(epoch) in mgr.all_steps():  # written before a crash; a resumed run recomputes it identically
                continue
            mgr.save(int(epoch), args=args, force=True)
            mgr.wait_until_finished()

    def restore(self, which: str = LATEST, epoch: Optional[int] = None, *, target: Optional[PyTree] = None,
                meta: bool = True) -> tuple[PyTree, Optional[dict]]:
        """``(tree, meta)`` of ``epoch`` (default: the newest) of ``which``.

        Args:
          target: the saved tree's structure as arrays or ``jax.ShapeDtypeStruct`` s: the
            restored arrays are placed like it (same shardings). None: as they were saved.
          meta: also read the JSON item (else ``meta`` is None).

        Raises:
          FileNotFoundError: ``which`` has no checkpoint (or not ``epoch``).
        """
        mgr = self._managers.get(check_which(which))
        epoch = (None if mgr is None else mgr.latest_step()) if epoch is None else int(epoch)
        if mgr is None or epoch is None or epoch not in mgr.all_steps():
            what = f"epoch {epoch} of" if epoch is not None else "any"
            raise FileNotFoundError(f"no {what} {which!r} checkpoint in {self.directory / which}")
        abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if meta:
            items["meta"] = ocp.args.JsonRestore()
        out = mgr.restore(epoch, args=ocp.args.Composite(**items))
        return out["state"], (dict(out["meta"]) if meta else None)

    def close(self) -> None:
        for m in self._managers.values():
            m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
