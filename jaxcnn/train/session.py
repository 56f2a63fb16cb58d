"""A run session: everything one ``fit`` call holds on its run folder while it trains.

:class:`RunSession` is one context manager for what used to be five nested ``with`` blocks:

* the folder's **lock** (process 0: one run at a time trains into a folder);
* **deferred signals**: the first SIGINT / SIGTERM is noted, and the loop stops where it can
  (``jaxcnn.signals``); :meth:`RunSession.signal` reads it, agreed between processes;
* the **overwrite guard**: with ``overwrite`` the old run is set aside (``<run>/.previous/``)
  and deleted once the new run has saved its first checkpoint; a run that ends before that,
  however it ends, gets it back;
* the **checkpoints** (Orbax, ``<run>/checkpoints/``) and the **start**: fresh, or with
  ``resume`` the newest readable latest / interrupted checkpoint and the best weights, a
  damaged checkpoint moved aside with a warning (:class:`Start`);
* ``config.json``, written once the run is known to start, and **TensorBoard** (process 0).

``fit`` (``jaxcnn.train.loop``) enters it, trains epoch by epoch through :meth:`end_epoch`
(history row, callbacks, checkpoint, records), calls :meth:`end_training` (checkpoints
written, TensorBoard closed, the old run deleted or back) and then writes the summary and the
end-of-run report while the lock and the deferred signals are still held.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from jaxcnn.errors import RunInterrupted
from jaxcnn.runfolder import HISTORY_FIELDS, DamagedCheckpointError, NothingToDo, RunFolder, reported_weights
from jaxcnn.signals import signal_name, signals_deferred
from jaxcnn.train.callbacks import EpochCallbacks
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import Processes
from jaxcnn.train.state import TrainState, ema_view, set_learning_rate, state_from_tree, state_to_tree

log = logging.getLogger("jaxcnn")


@dataclasses.dataclass
class Best:
    """The weights the run reports: of the epochs whose weights it has, the one with the lowest
    validation loss (the callbacks' best epoch, unless that epoch's checkpoint was lost); with an
    EMA, that epoch's EMA (``jaxcnn.runfolder.reported_weights``)."""

    epoch: int
    val_loss: float
    params: dict
    batch_stats: dict


@dataclasses.dataclass
class Start:
    """Where a run starts: fresh, the latest checkpoint, or mid-epoch from an interrupted one."""

    state: TrainState
    epoch: int = 0  # epochs done
    history: list = dataclasses.field(default_factory=list)
    best: Optional[Best] = None  # the weights the run reports so far
    wall_s: float = 0.0  # wall time the run had before this process
    position: int = 0  # steps done in epoch ``epoch + 1`` (a run stopped mid-epoch)
    sums: Optional[dict] = None  # its running loss / accuracy sums
    best_replaced: bool = False  # the best checkpoint was lost and another epoch's took its place


class RunSession:
    """One ``fit`` call's hold on its run folder (see the module's docstring).

    Args:
      run: the run folder.
      record: what ``config.json`` gets (``jaxcnn.train.run_config``); checked against the
        saved one on ``resume``.
      config: the loop's settings (the callbacks, how many checkpoints to keep).
      template: the fresh state, placed on the mesh (a resume restores into its structure).
      procs: this process among the run's processes; process 0 holds the lock and writes the records.
      resume, overwrite: as ``fit``'s.
      report_missing: ``() -> bool``, asked when ``resume`` finds a run with all its epochs and
        its summary: True when its end-of-run report is missing (the session then lets the
        caller write it instead of raising ``NothingToDo``).

    After ``__enter__``: ``start`` (:class:`Start`), ``callbacks``, ``trained`` (the run has
    all its epochs: only the summary and report are to be written).
    """

    def __init__(self, run: RunFolder, record: dict, config: FitConfig, template: TrainState, procs: Processes, *,
                 resume: bool, overwrite: bool, report_missing: Callable[[], bool] = lambda: False):
        self.run, self.record, self.config, self.template, self.procs = run, record, config, template, procs
        self.resume, self.overwrite, self.report_missing = resume, overwrite, report_missing
        self.callbacks = EpochCallbacks.from_config(config)
        self._held = contextlib.ExitStack()
        self._training = contextlib.ExitStack()

    # ------------------------------------------------------------------ entering and leaving

    def __enter__(self) -> "RunSession":
        run, procs = self.run, self.procs
        with contextlib.ExitStack() as held:
            procs.on_primary(lambda: held.enter_context(run.lock()) and None)
            self.stop = held.enter_context(signals_deferred())
            self.old = held.enter_context(_old_run_kept_until_checkpointed(run, self.overwrite and procs.primary))
            for note in procs.on_primary(lambda: run.prepare(self.record, resume=self.resume,
                                                             overwrite=self.overwrite)):
                log.warning(note)
            with contextlib.ExitStack() as training:
                self.ckpts = training.enter_context(run.checkpoints(keep=self.config.keep_checkpoints))
                self.start = self._start() if self.resume else Start(self.template)
                self._check_something_to_do()
                if not self.trained and procs.primary:  # (trained: config.json stays as it is)
                    run.write_config(self.record)
                self.board = training.enter_context(run.tensorboard() if procs.primary else _NoBoard())
                self._training = training.pop_all()
            held.push(self._training)  # closed first on the way out (or earlier, by end_training)
            self._held = held.pop_all()
        return self

    def __exit__(self, *exc) -> bool:
        return self._held.__exit__(*exc)

    def end_training(self) -> bool:
        """The training is over: checkpoints written (Orbax's saves finished), TensorBoard closed,
        and with ``overwrite`` the old run deleted, or put back when the new run saved no
        checkpoint. Returns True when the old run was put back."""
        self._training.close()
        return bool(self.procs.share(self.old.settle()))

    # ------------------------------------------------------------------ during training

    def signal(self) -> Optional[int]:
        """The signal that arrived on any process since the last look, or None."""
        if self.procs.count == 1:
            return self.stop["signal"]
        got = max(self.procs.gather(self.stop["signal"] or 0))
        return got or None

    def interrupted(self, epoch: int, signum: Optional[int] = None, *, step: Optional[int] = None,
                    steps: Optional[int] = None) -> RunInterrupted:
        """The ``RunInterrupted`` to raise: stopped in epoch ``epoch`` at ``step`` of ``steps`` (its
        checkpoint saved), or after epoch ``epoch`` (``step`` None)."""
        signum = signum or self.stop["signal"] or 15  # (SIGTERM: a peer's signal, not seen here)
        path = self.run.path
        if step is None and epoch == 0:
            text = (f"stopped by {signal_name(signum)} before the first epoch ended; no checkpoint was saved. "
                    f"Start it again with --resume (--workdir {path})")
        else:
            where = (f"in epoch {epoch} at step {step} of {steps}; saved a checkpoint of that step"
                     if step is not None else f"after epoch {epoch}, whose checkpoint is saved")
            text = (f"stopped by {signal_name(signum)} {where}. Continue it with --resume "
                    f"(--workdir {path}): it picks up exactly there")
        return RunInterrupted(text, signum)

    def save_interrupted(self, state: TrainState, meta: dict) -> None:
        """A checkpoint of the step a signal stopped the run at (``resume`` continues from it)."""
        self.ckpts.save_interrupted(int(state.step), state_to_tree(state), {**meta, **self.callbacks.state_dict()})

    def end_epoch(self, epoch: int, row: dict, state: TrainState, best: Optional[Best], history: list,
                  wall_time_s: float) -> tuple[TrainState, Optional[Best]]:
        """The end of epoch ``epoch``: its row in the history, the callbacks' decisions (early
        stopping, the next learning rate), its checkpoint (and the best one, when it has the
        lowest validation loss of the epochs whose weights the run has), and the records
        (process 0). Returns the state and the best weights."""
        history.append(row)
        _, next_lr = self.callbacks.update(epoch, row["val_loss"], row["lr"])
        # as the callbacks' "improved" (min_delta 0), unless a lost best was replaced by a worse epoch
        improved = best is None or row["val_loss"] < best.val_loss
        if improved:  # copies: the next train step donates (invalidates) the state's buffers
            view = ema_view(state)  # (the weights evaluated)
            best = Best(epoch, row["val_loss"], *jax.tree.map(jnp.copy, (view.params, view.batch_stats)))
        if next_lr != row["lr"]:
            state = set_learning_rate(state, next_lr)
        meta = {"epoch": epoch, "history": history, **self.callbacks.state_dict(), "wall_time_s": wall_time_s}
        self.ckpts.save(epoch, state_to_tree(state), meta, best=improved)
        if self.procs.primary:
            self.run.write_history(history)
        for k in HISTORY_FIELDS[1:]:
            self.board.add_scalar(k, row[k], epoch)
        self.board.flush()
        self.old.checkpointed()  # overwrite: the new run has a checkpoint; the old one goes now
        return state, best

    # ------------------------------------------------------------------ the start

    def _check_something_to_do(self) -> None:
        start, procs, run = self.start, self.procs, self.run
        self.trained = start.position == 0 and (start.epoch >= self.config.epochs or self.callbacks.should_stop)
        # trained, with a summary of the weights it has and its report: nothing to do. (Without a summary,
        # or with one of a best that was lost, or without its report: the test scores and report are made again.)
        if not self.trained or start.best_replaced:
            return
        state = procs.on_primary(lambda: "complete" if not run.read_summary() else
                                 "no report" if self.report_missing() else "done")
        if state == "done":
            raise NothingToDo(f"{run.path} already has {start.epoch} epochs"
                              + (" (it stopped early)" if self.callbacks.should_stop else "")
                              + f", and {self.config.epochs} were asked for; ask for more epochs to train on")
        if state == "no report" and procs.primary:
            log.warning(f"{run.path}: the run has its epochs but not its end-of-run report; writing it")

    def _start(self) -> Start:
        """The resume point: the newer of the latest and the interrupted checkpoint that can be read
        (damaged ones, ill-formed metadata included, are moved aside, with a warning), and the best
        weights (:meth:`_best_weights`)."""
        target = state_to_tree(self.template)
        resumable = functools.partial(_resume_meta_problem, self.callbacks)
        latest = self._newest_readable("latest", target, resumable)
        stopped = self._newest_readable("interrupted", target, resumable)
        if stopped is not None and (latest is None or stopped[1]["epoch"] >= latest[1]["epoch"]):
            latest = stopped
        if latest is None:
            return Start(self.template)
        tree, meta = latest
        self.callbacks.load_state_dict(meta)
        history = list(meta["history"])
        best, replaced = self._best_weights(target, history, int(meta["epoch"]))
        return Start(state_from_tree(self.template, tree), int(meta["epoch"]), history, best,
                     float(meta["wall_time_s"]), int(meta.get("position", 0)), meta.get("sums"), replaced)

    def _best_weights(self, target, history: list, epoch: int) -> tuple[Optional[Best], bool]:
        """The best weights at the resume point (epoch ``epoch``), and whether the best checkpoint
        had to be replaced.

        The best checkpoint is that of the callbacks' best epoch. When it is lost (damaged, moved
        aside, missing), the epoch with the lowest validation loss among those whose checkpoint
        reads back (the best one left, the latest ones) takes its place: saved as the best
        checkpoint, and said in one warning line. From there on a later epoch becomes the best when
        its validation loss is lower than that epoch's. None: no epoch's weights are left.
        """
        ckpts, procs, callbacks = self.ckpts, self.procs, self.callbacks
        val = {int(r["epoch"]): float(r["val_loss"]) for r in history}
        wanted = callbacks.best_epoch
        found = self._newest_readable("best", target, _best_meta_problem)
        if found is not None:
            found_epoch = int(found[1]["epoch"])
            if found_epoch == wanted or found_epoch > epoch:  # (newer: saved just before a crash; it is retrained)
                return Best(found_epoch, val.get(found_epoch, callbacks.early.best),
                            *reported_weights(found[0])), False
        if not wanted:  # stopped in its first epoch: no best yet
            return None, False
        candidates = sorted({e for e in ckpts.all_epochs("latest") if e in val} | ({found_epoch} if found else set()),
                            key=lambda e: (val[e], e))
        for e in candidates:
            got = found if found is not None and e == found_epoch else \
                self._readable("latest", e, target, functools.partial(_resume_meta_problem, callbacks))
            if got is None:
                continue
            if not (found is not None and e == found_epoch):
                ckpts.replace_best(e, *got)
            if procs.primary:
                log.warning(f"the best epoch's checkpoint (epoch {wanted}) is lost; epoch {e} (val loss {val[e]:.4f}), "
                            f"the best epoch whose checkpoint reads back, is the run's best in its place")
            return Best(e, val[e], *reported_weights(got[0])), True
        if procs.primary:
            log.warning(f"the best epoch's checkpoint (epoch {wanted}) is lost and no other epoch's checkpoint reads "
                        f"back; the run's best is the best epoch it trains from here on")
        return None, True

    def _readable(self, which: str, step: int, target, problem=None,
                  then: Optional[Callable[[], str]] = None) -> Optional[tuple]:
        """``(tree, meta)`` of checkpoint ``step`` of ``which`` if it reads back whole on every process
        and ``problem(meta)`` finds nothing wrong; else None, after process 0 moved it aside and
        said so (``then()``: what happens next, for the warning)."""
        ckpts, procs = self.ckpts, self.procs
        damage = None
        try:
            restored = ckpts.restore(which, step, target=target)
            reason = problem(restored[1]) if problem is not None else None
            if reason:
                damage = str(DamagedCheckpointError(ckpts.directory / which / str(step), reason))
        except DamagedCheckpointError as e:
            damage = str(e)
        damaged = [d for d in procs.gather_text(damage or "") if d] if procs.count > 1 else [damage] * bool(damage)
        if not damaged:
            return restored
        moved = procs.on_primary(lambda: str(ckpts.quarantine(which, step)))
        ckpts.reload()
        if procs.primary:
            log.warning(f"{damaged[0]}. Moved it to {moved}" + (f"; {then()}" if then is not None else ""))
        return None

    def _newest_readable(self, which: str, target, problem=None) -> Optional[tuple]:
        """``(tree, meta)`` of the newest checkpoint of ``which`` that reads back whole (on every
        process) with well-formed metadata, or None. Process 0 moves a damaged one aside; every
        process then tries the next."""
        for step in reversed(self.ckpts.all_epochs(which)):
            def then(step=step):
                older = [s for s in self.ckpts.all_epochs(which) if s < step]
                return f"falling back to {which} {older[-1]}" if older else f"no older {which} checkpoint"
            restored = self._readable(which, step, target, problem, then)
            if restored is not None:
                return restored
        return None


def _resume_meta_problem(callbacks: EpochCallbacks, meta: dict) -> Optional[str]:
    """What is wrong with a resume point's metadata (a key missing, a value of the wrong kind), or None."""
    try:
        int(meta["epoch"]), float(meta["wall_time_s"]), int(meta.get("position", 0))
        if not isinstance(meta["history"], list) or len(meta["history"]) != int(meta["epoch"]):
            return "its meta's history does not have a row per epoch"
        for row in meta["history"]:
            int(row["epoch"]), float(row["val_loss"])
        copy.deepcopy(callbacks).load_state_dict(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"its meta is ill-formed ({type(e).__name__}: {e})"
    return None


def _best_meta_problem(meta: dict) -> Optional[str]:
    try:
        int(meta["epoch"])
    except (KeyError, TypeError, ValueError) as e:
        return f"its meta is ill-formed ({type(e).__name__}: {e})"
    return None


class _NoBoard:
    """TensorBoard for processes other than 0: writes nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass


class _OldRun:
    """The run an ``overwrite`` set aside: deleted at the new run's first checkpoint (``checkpointed``),
    or at the end (``settle``: deleted, or put back when the new run saved no checkpoint)."""

    def __init__(self, run: RunFolder, overwrite: bool):
        self.run, self.overwrite, self.deleted, self.settled, self.restored = run, overwrite, False, False, False

    def checkpointed(self) -> None:
        if self.overwrite and not self.deleted:
            self.run.commit()
            self.deleted = True

    def settle(self) -> bool:
        """The new run's training is over: True when it saved no checkpoint and the old run is back."""
        if self.overwrite and not self.settled:
            self.settled = True
            if self.run.has_checkpoints():
                self.checkpointed()
            else:
                self.restored = self.run.restore()
        return self.restored


@contextlib.contextmanager
def _old_run_kept_until_checkpointed(run: RunFolder, overwrite: bool):
    """With ``overwrite``: the old run set aside is deleted once the new one has saved its first
    checkpoint (``old.checkpointed()``); a run that ends before that, however it ends, puts it back."""
    old = _OldRun(run, overwrite)
    try:
        yield old
    except BaseException:
        if overwrite and not run.has_checkpoints() and run.restore():
            log.warning(f"{run.path}: the new run stopped before its first checkpoint; the run it was to "
                        f"overwrite is back, unchanged")
        raise
    old.settle()  # (a run that diverged before its first checkpoint says so itself)
