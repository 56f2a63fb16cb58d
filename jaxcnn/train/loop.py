"""``fit``: the epoch loop — device-resident data, jitted steps, callbacks, checkpoints, records.

The run folder (``jaxcnn.runfolder.RunFolder``) gets ``config.json`` first (the model's
spec, preprocessing, data, optimizer and loop settings, so any process can rebuild the
model), then after every epoch: a ``latest`` checkpoint (and ``best`` when the validation
loss improved), ``history.json`` / ``.csv`` and TensorBoard scalars; at the end the best
weights are restored, the test set is evaluated once and ``summary.json`` written.

What can go wrong is handled here, and said in one sentence:

* one run at a time trains into a folder (its lock); ``overwrite`` keeps the old run (in
  ``<run>/.previous/``) until the new one has saved its first checkpoint, then deletes it;
* ``resume`` falls back past a damaged checkpoint to the newest readable one (the damaged
  one is moved to ``checkpoints/damaged/``), and says when there is nothing to do; a best
  checkpoint that is lost is replaced by the best epoch whose checkpoint reads back (said in
  one line), and the summary names the epoch whose weights it tested;
* SIGINT / SIGTERM stop the run at the next step with a checkpoint of where it is (mid-epoch:
  ``resume`` continues from that step, bitwise): :class:`RunInterrupted`; further signals are
  ignored while it stops (``jaxcnn.signals``);
* a training loss that is not finite or above ``FitConfig.max_loss`` (at any step), or a
  validation loss that is not finite, stops the run, keeps the last good checkpoints and writes
  the summary: :class:`TrainingDiverged`. (A finite validation spike is not divergence: early
  on, BatchNorm's running statistics may not yet fit the weights.)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxcnn.models.spec import model_spec, module_of
from jaxcnn.preprocess import get_preprocess
from jaxcnn.runfolder import FORMAT_VERSION, HISTORY_FIELDS, DamagedCheckpointError, NothingToDo, RunFolder
from jaxcnn.train import sharding
from jaxcnn.train.callbacks import EpochCallbacks
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import Processes
from jaxcnn.train.feed import EvalFeed, TrainFeed, evaluate
from jaxcnn.errors import RunInterrupted, TrainingDiverged
from jaxcnn.signals import signal_name, signals_deferred
from jaxcnn.train.state import TrainState, get_learning_rate, set_learning_rate, state_from_tree, state_to_tree
from jaxcnn.train.steps import make_eval_step, make_train_step

log = logging.getLogger("jaxcnn")


__all__ = ["RunInterrupted", "TrainingDiverged", "fit", "run_config", "train_epoch"]


def fit(state: TrainState, dataset, config: FitConfig, workdir, *, labels=None,
        train_step: Optional[Callable] = None, eval_step: Optional[Callable] = None, mesh=None,
        resume: bool = False, overwrite: bool = False, progress: bool = True, model: Optional[nn.Module] = None,
        experiment: Optional[dict] = None) -> tuple[TrainState, list[dict], dict]:
    """Train ``state`` on ``dataset`` and record the run in the run folder ``workdir``.

    Args:
      state: a fresh ``TrainState`` (when resuming: one built the same way, the template). It
        is consumed: the jitted step donates its buffers (copy what you need first).
      dataset: a ``jaxcnn.data.Dataset`` (uint8 ``(N, H, W, C)`` images, int32 labels).
      config: the loop's ``FitConfig`` (the learning rate is the optimizer's).
      workdir: the run folder (created). One that holds checkpoints is refused unless
        ``resume`` (continue exactly from its latest checkpoint) or ``overwrite`` (the old run
        is set aside in ``<workdir>/.previous/``, still taking its disk space, and deleted once
        the new one has saved its first checkpoint; put back if the new one stops before).
      labels: a ``"trainable"``/``"frozen"`` label tree (``jaxcnn.freeze``): frozen parameters
        get no gradient (build ``state.tx`` with ``adam(labels=labels)`` too).
      train_step, eval_step: steps built once by the caller and reused over several ``fit``
        calls (plain or jitted; default: built here from ``config`` and ``labels``).
      mesh: a 1-D ``data`` mesh (default: all devices); batch sizes must divide by its size.
      progress: a tqdm bar per epoch.
      model: the Flax module, for the model spec in ``config.json``; default: the module
        behind ``state.apply_fn`` (``model.apply``, or a ``functools.partial`` of it).
      experiment: the calling experiment's own settings, saved as ``config["experiment"]``.

    Returns:
      ``(state, history, summary)``: the state with the **best** weights, the per-epoch
      rows (``HISTORY_FIELDS``), and the summary also written to ``summary.json``.

    Raises:
      ValueError / FileExistsError / FileNotFoundError / jaxcnn.runfolder.RunBusyError: the
        run cannot start (a setting, the folder); nothing was changed.
      jaxcnn.runfolder.NothingToDo: ``resume`` of a run that already has ``config.epochs``.
      RunInterrupted: SIGINT / SIGTERM; resume continues from the step it stopped at.
      TrainingDiverged: the loss diverged; the records and the last good checkpoints stay.
    """
    t_start = time.perf_counter()
    procs = Processes()  # one process, or this one of several (jax.distributed): process 0 writes the records
    mesh = sharding.make_mesh() if mesh is None else mesh
    train_feed = TrainFeed(dataset.train, config.batch_size, mesh, seed=config.seed, processes=procs)
    val_feed = EvalFeed(dataset.val, config.eval_batch_size, mesh, processes=procs)
    run = RunFolder(workdir)
    record = run_config(state, dataset, config, model=model, experiment=experiment)
    procs.check_same_config(record)
    procs.on_primary(run.check_writable)
    train_step, eval_step = _steps(config, labels, train_step, eval_step)
    accumulate = _accumulator(config.max_loss)
    callbacks = EpochCallbacks.from_config(config)
    with contextlib.ExitStack() as held:
        procs.on_primary(lambda: held.enter_context(run.lock()) and None)
        stop = held.enter_context(signals_deferred())
        old = held.enter_context(_old_run_kept_until_checkpointed(run, overwrite and procs.primary))
        for note in procs.on_primary(lambda: run.prepare(record, resume=resume, overwrite=overwrite)):
            log.warning(note)
        with run.checkpoints(keep=config.keep_checkpoints) as ckpts:
            template = sharding.replicate(state, mesh)
            start = _start(ckpts, template, callbacks, procs) if resume else _Start(template)
            trained = start.position == 0 and (start.epoch >= config.epochs or callbacks.should_stop)
            # trained, with a summary of the weights it has: nothing to do. (Without a summary, or with
            # one of a best that was lost: the test evaluation and summary are made again.)
            if trained and not start.best_replaced and procs.on_primary(lambda: bool(run.read_summary())):
                raise NothingToDo(f"{run.path} already has {start.epoch} epochs"
                                  + (" (it stopped early)" if callbacks.should_stop else "")
                                  + f", and {config.epochs} were asked for; ask for more epochs to train on")
            if not trained and procs.primary:  # (trained: config.json stays as it is)
                run.write_config(record)
            state, epoch, history, best, diverged = start.state, start.epoch, start.history, start.best, None
            position, sums, wall = start.position, start.sums, start.wall_s - t_start  # wall + perf_counter()
            with run.tensorboard() if procs.primary else _NoBoard() as tb:
                while epoch < config.epochs and not callbacks.should_stop:
                    if _signal_between_epochs(stop, procs) is not None:  # the latest checkpoint is where it stopped
                        signum = stop["signal"] or signal.SIGTERM
                        raise RunInterrupted(_interrupted_message(signum, run, epoch, None, None), signum)
                    t0 = time.perf_counter()
                    out = train_epoch(state, train_step, train_feed, epoch + 1, config.epochs, start=position,
                                      sums=sums, accumulate=accumulate, stop=stop,
                                      progress=progress and procs.primary)
                    state, position, sums = out.state, 0, None
                    if out.stopped_by is not None:
                        ckpts.save_interrupted(int(state.step), state_to_tree(state), {
                            "epoch": epoch, "position": out.steps_done, "sums": out.sums, "history": history,
                            **callbacks.state_dict(), "wall_time_s": wall + time.perf_counter()})
                        raise RunInterrupted(_interrupted_message(out.stopped_by, run, epoch + 1, out.steps_done,
                                                                  train_feed.steps_per_epoch), out.stopped_by)
                    val = evaluate(state, val_feed, eval_step) if out.bad_step is None else None
                    diverged = _divergence(out, val, epoch + 1, train_feed.steps_per_epoch, config.max_loss)
                    if diverged:
                        break
                    epoch += 1
                    row = {**out.row, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                           "epoch_time_s": time.perf_counter() - t0}
                    state, best = _end_epoch(epoch, row, state, best, history, callbacks, ckpts,
                                             wall + time.perf_counter(), run if procs.primary else None, tb)
                    old.checkpointed()  # overwrite: the new run has a checkpoint; the old one goes now
        if not diverged and _signal_between_epochs(stop, procs) is not None:  # (in the last epoch's end)
            signum = stop["signal"] or signal.SIGTERM  # resume then runs the test evaluation
            raise RunInterrupted(_interrupted_message(signum, run, epoch, None, None), signum)
    if procs.share(old.restored):  # diverged before its first checkpoint: the run it was to overwrite is back
        raise TrainingDiverged(_diverged_message(diverged, history, callbacks, state, run, restored=True), {})
    if best is not None:
        state = state.replace(params=best.params, batch_stats=best.batch_stats)
    test_feed = EvalFeed(dataset.test, config.eval_batch_size, mesh, processes=procs)
    test = evaluate(state, test_feed, eval_step) if best is not None or not diverged else None
    summary = _summary(history, callbacks, test, dataset, epoch, wall + time.perf_counter(), diverged,
                       num_train=train_feed.num_examples, best_epoch=best.epoch if best is not None else 0)
    if procs.primary:
        run.write_summary(summary)
    if diverged:
        raise TrainingDiverged(_diverged_message(diverged, history, callbacks, state, run), summary)
    return state, history, summary


def _signal_now(stop: dict, procs: Processes, done: int) -> Optional[int]:
    """The signal to stop at after step ``done``: every step with one process; with several, all
    stop at the same step, so they agree every 20 steps (a signal to any of them stops all)."""
    if procs.count == 1:
        return stop["signal"]
    return _signal_between_epochs(stop, procs) if done % 20 == 0 else None


def _signal_between_epochs(stop: dict, procs: Processes) -> Optional[int]:
    """The signal that arrived (on any process) since the last step, or None."""
    if procs.count == 1:
        return stop["signal"]
    got = max(procs.gather(stop["signal"] or 0))
    return got or None


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


@dataclasses.dataclass
class _Best:
    """The weights the run reports: of the epochs whose weights it has, the one with the lowest
    validation loss (the callbacks' best epoch, unless that epoch's checkpoint was lost)."""

    epoch: int
    val_loss: float
    params: dict
    batch_stats: dict


def _end_epoch(epoch: int, row: dict, state: TrainState, best: Optional[_Best], history: list,
               callbacks: EpochCallbacks, ckpts, wall_time_s: float, run: Optional[RunFolder], tb
               ) -> tuple[TrainState, Optional[_Best]]:
    """The end of epoch ``epoch``: its row in the history, the callbacks' decisions (early
    stopping, the next learning rate), its checkpoint (and the best one, when it has the lowest
    validation loss of the epochs whose weights the run has), and the records (``run``:
    process 0's run folder, None on the other processes). Returns the state and the best weights."""
    history.append(row)
    _, next_lr = callbacks.update(epoch, row["val_loss"], row["lr"])
    # as the callbacks' "improved" (min_delta 0), unless a lost best was replaced by a worse epoch
    improved = best is None or row["val_loss"] < best.val_loss
    if improved:  # copies: the next train step donates (invalidates) the state's buffers
        best = _Best(epoch, row["val_loss"], *jax.tree.map(jnp.copy, (state.params, state.batch_stats)))
    if next_lr != row["lr"]:
        state = set_learning_rate(state, next_lr)
    meta = {"epoch": epoch, "history": history, **callbacks.state_dict(), "wall_time_s": wall_time_s}
    ckpts.save(epoch, state_to_tree(state), meta, best=improved)
    if run is not None:
        run.write_history(history)
    for k in HISTORY_FIELDS[1:]:
        tb.add_scalar(k, row[k], epoch)
    tb.flush()
    return state, best


@dataclasses.dataclass
class EpochResult:
    """What ``train_epoch`` did: the state, the epoch's training row (when it ran to the end),
    the steps done, and why it stopped early (a signal, or the step whose loss diverged, and that loss)."""

    state: TrainState
    row: dict
    sums: dict
    steps_done: int
    stopped_by: Optional[int] = None
    bad_step: Optional[int] = None
    bad_loss: Optional[float] = None


def train_epoch(state: TrainState, train_step: Callable, feed: TrainFeed, epoch: int, epochs: int, *,
                start: int = 0, sums: Optional[dict] = None, accumulate: Optional[Callable] = None, stop=None,
                progress: bool = True) -> EpochResult:
    """One pass over ``feed``'s batches of epoch ``epoch``, from batch ``start`` with the running
    ``sums`` of a run stopped mid-epoch.

    ``accumulate``: ``_accumulator(max_loss)`` (built once per ``fit``): the epoch stops at the
    next check (every 20 steps) after a step whose loss is not finite or above ``max_loss``
    (``bad_step``: the first such step). ``stop``: ``{"signal": None}``, set by a signal
    handler: the epoch stops after the current step (``stopped_by``).
    """
    t0 = time.perf_counter()
    waited = feed.source.wait_s
    lr = get_learning_rate(state.opt_state)
    steps = feed.steps_per_epoch
    accumulate = _accumulator(None) if accumulate is None else accumulate
    sums = sums or {}
    totals = {"loss": jnp.float32(sums.get("loss", 0.0)), "accuracy": jnp.float32(sums.get("accuracy", 0.0)),
              "bad": jnp.int32(-1), "bad_loss": jnp.float32(0.0)}
    done, stopped_by, bad, bad_loss = start, None, None, None
    with tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress,
              dynamic_ncols=True) as bar:
        for i, batch in enumerate(feed.epoch(epoch, start=start), start=start):
            state, metrics = train_step(state, batch)
            totals = accumulate(totals, metrics, i)
            done = i + 1
            if done % 20 == 0 or done == steps:  # reading the sums waits for the device
                m = jax.device_get(totals)
                if int(m["bad"]) >= 0:
                    bad, bad_loss = int(m["bad"]), float(m["bad_loss"])
                    break
                bar.set_postfix(loss=f"{m['loss'] / done:.4f}", acc=f"{m['accuracy'] / done:.4f}",
                                img_s=f"{(done - start) * feed.batch_size / (time.perf_counter() - t0):.0f}")
                bar.update(done - bar.n)
            if stop is not None and done < steps:
                stopped_by = _signal_now(stop, feed.processes, done)
                if stopped_by is not None:
                    break
    m = jax.device_get(totals)
    host = {"loss": float(m["loss"]), "accuracy": float(m["accuracy"])}  # float32 values: exact in JSON
    row = {"epoch": epoch, "train_loss": host["loss"] / steps, "train_accuracy": host["accuracy"] / steps,
           "lr": float(f"{lr:.7g}"),  # the float32 rate, without float32's decimal noise
           "images_per_s": (done - start) * feed.batch_size / max(time.perf_counter() - t0, 1e-9)}
    if feed.source.streamed:  # batches read from disk: the share of the epoch spent waiting for them
        row["data_wait_fraction"] = (feed.source.wait_s - waited) / max(time.perf_counter() - t0, 1e-9)
    return EpochResult(state, row, host, done, stopped_by, bad, bad_loss)


def _accumulator(max_loss: Optional[float]) -> Callable:
    """A jitted ``(totals, metrics, i) -> totals``: running sums, and the first step ``i`` whose
    loss is not finite or above ``max_loss`` (None: no limit) with that loss (-1 while there is none)."""
    limit = math.inf if max_loss is None else max_loss

    @jax.jit
    def acc(totals, metrics, i):
        bad = ~jnp.isfinite(metrics["loss"]) | (metrics["loss"] > limit)
        now = (totals["bad"] < 0) & bad
        return {"loss": totals["loss"] + metrics["loss"], "accuracy": totals["accuracy"] + metrics["accuracy"],
                "bad": jnp.where(now, jnp.int32(i), totals["bad"]),
                "bad_loss": jnp.where(now, metrics["loss"].astype(jnp.float32), totals["bad_loss"])}

    return acc


def run_config(state: TrainState, dataset, config: FitConfig, *, model: Optional[nn.Module] = None,
               experiment: Optional[dict] = None) -> dict:
    """What ``fit`` writes to ``config.json``: enough to rebuild the model, reload the data and
    check a resume, in any process.

    ``{"model": spec, "data": {...}, "optimizer": {"learning_rate"}, "fit": {...}, "experiment": {...}}``
    (the input preprocessing is ``fit.preprocess``); ``model`` is None when no Flax module is known.
    """
    model = module_of(state.apply_fn) if model is None else model
    sizes = {k: len(getattr(dataset, k)) for k in ("train", "val", "test")}  # every process holds whole splits
    return {
        "format_version": FORMAT_VERSION,
        "model": None if model is None else model_spec(model),
        "data": {"name": dataset.name, "source": dataset.source, "image_shape": list(dataset.image_shape),
                 "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
                 **{f"num_{k}": int(n) for k, n in sizes.items()}},
        "optimizer": {"learning_rate": float(f"{get_learning_rate(state.opt_state):.7g}")},
        "fit": config.to_dict(),
        "experiment": dict(experiment or {}),
    }


def _steps(config: FitConfig, labels, train_step, eval_step) -> tuple[Callable, Callable]:
    """The jitted steps of this ``fit`` call: the caller's, or built once from the config."""
    if labels is not None and train_step is not None:
        raise ValueError("fit: pass labels= (fit builds the step) or train_step= (built with them), not both")
    preprocess = get_preprocess(config.preprocess)
    if train_step is None:
        augment_fn = None if config.augment is None else config.augment.fn()
        train_step = make_train_step(labels=labels, augment_fn=augment_fn, preprocess=preprocess)
    if eval_step is None:
        eval_step = make_eval_step(preprocess=preprocess)
    jitted = lambda f, **kw: f if hasattr(f, "lower") else jax.jit(f, **kw)  # noqa: E731
    return jitted(train_step, donate_argnums=0), jitted(eval_step)


@dataclasses.dataclass
class _Start:
    """Where a run starts: fresh, the latest checkpoint, or mid-epoch from an interrupted one."""

    state: TrainState
    epoch: int = 0  # epochs done
    history: list = dataclasses.field(default_factory=list)
    best: Optional[_Best] = None  # the weights the run reports so far
    wall_s: float = 0.0  # wall time the run had before this process
    position: int = 0  # steps done in epoch ``epoch + 1`` (a run stopped mid-epoch)
    sums: Optional[dict] = None  # its running loss / accuracy sums
    best_replaced: bool = False  # the best checkpoint was lost and another epoch's took its place


def _start(ckpts, template: TrainState, callbacks: EpochCallbacks, procs: Optional[Processes] = None) -> _Start:
    """The resume point: the newer of the latest and the interrupted checkpoint that can be read
    (damaged ones, ill-formed metadata included, are moved aside, with a warning), and the best
    weights (``_best_weights``)."""
    procs = Processes() if procs is None else procs
    target = state_to_tree(template)
    resumable = functools.partial(_resume_meta_problem, callbacks)
    latest = _newest_readable(ckpts, "latest", target, procs, resumable)
    stopped = _newest_readable(ckpts, "interrupted", target, procs, resumable)
    if stopped is not None and (latest is None or stopped[1]["epoch"] >= latest[1]["epoch"]):
        latest = stopped
    if latest is None:
        return _Start(template)
    tree, meta = latest
    callbacks.load_state_dict(meta)
    history = list(meta["history"])
    best, replaced = _best_weights(ckpts, target, procs, history, callbacks, int(meta["epoch"]))
    return _Start(state_from_tree(template, tree), int(meta["epoch"]), history, best,
                  float(meta["wall_time_s"]), int(meta.get("position", 0)), meta.get("sums"), replaced)


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


def _best_weights(ckpts, target, procs: Processes, history: list, callbacks: EpochCallbacks, epoch: int
                  ) -> tuple[Optional[_Best], bool]:
    """The best weights at the resume point (epoch ``epoch``), and whether the best checkpoint
    had to be replaced.

    The best checkpoint is that of the callbacks' best epoch. When it is lost (damaged, moved
    aside, missing), the epoch with the lowest validation loss among those whose checkpoint
    reads back (the best one left, the latest ones) takes its place: saved as the best
    checkpoint, and said in one warning line. From there on a later epoch becomes the best when
    its validation loss is lower than that epoch's. None: no epoch's weights are left.
    """
    val = {int(r["epoch"]): float(r["val_loss"]) for r in history}
    wanted = callbacks.best_epoch
    found = _newest_readable(ckpts, "best", target, procs, _best_meta_problem)
    if found is not None:
        found_epoch = int(found[1]["epoch"])
        if found_epoch == wanted or found_epoch > epoch:  # (newer: saved just before a crash; it is retrained)
            return _Best(found_epoch, val.get(found_epoch, callbacks.early.best), found[0]["params"],
                         found[0]["batch_stats"]), False
    if not wanted:  # stopped in its first epoch: no best yet
        return None, False
    candidates = sorted({e for e in ckpts.all_epochs("latest") if e in val} | ({found_epoch} if found else set()),
                        key=lambda e: (val[e], e))
    for e in candidates:
        got = found if found is not None and e == found_epoch else \
            _readable(ckpts, "latest", e, target, procs, functools.partial(_resume_meta_problem, callbacks))
        if got is None:
            continue
        if not (found is not None and e == found_epoch):
            ckpts.replace_best(e, *got)
        if procs.primary:
            log.warning(f"the best epoch's checkpoint (epoch {wanted}) is lost; epoch {e} (val loss {val[e]:.4f}), the "
                        f"best epoch whose checkpoint reads back, is the run's best in its place")
        return _Best(e, val[e], got[0]["params"], got[0]["batch_stats"]), True
    if procs.primary:
        log.warning(f"the best epoch's checkpoint (epoch {wanted}) is lost and no other epoch's checkpoint reads "
                    f"back; the run's best is the best epoch it trains from here on")
    return None, True


def _readable(ckpts, which: str, step: int, target, procs: Processes, problem=None,
              then: Optional[Callable[[], str]] = None) -> Optional[tuple]:
    """``(tree, meta)`` of checkpoint ``step`` of ``which`` if it reads back whole on every process
    and ``problem(meta)`` finds nothing wrong; else None, after process 0 moved it aside and
    said so (``then()``: what happens next, for the warning)."""
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


def _newest_readable(ckpts, which: str, target, procs: Processes, problem=None) -> Optional[tuple]:
    """``(tree, meta)`` of the newest checkpoint of ``which`` that reads back whole (on every
    process) with well-formed metadata, or None. Process 0 moves a damaged one aside; every
    process then tries the next."""
    for step in reversed(ckpts.all_epochs(which)):
        def then(step=step):
            older = [s for s in ckpts.all_epochs(which) if s < step]
            return f"falling back to {which} {older[-1]}" if older else f"no older {which} checkpoint"
        restored = _readable(ckpts, which, step, target, procs, problem, then)
        if restored is not None:
            return restored
    return None


class _OldRun:
    """The run an ``overwrite`` set aside: deleted at the new run's first checkpoint (``checkpointed``)."""

    def __init__(self, run: RunFolder, overwrite: bool):
        self.run, self.overwrite, self.restored, self.deleted = run, overwrite, False, False

    def checkpointed(self) -> None:
        if self.overwrite and not self.deleted:
            self.run.commit()
            self.deleted = True


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
    if overwrite:  # (a run that diverged before its first checkpoint says so itself)
        if run.has_checkpoints():
            run.commit()
        else:
            old.restored = run.restore()


def _interrupted_message(signum: int, run: RunFolder, epoch: int, step: Optional[int], steps: Optional[int]) -> str:
    if step is None and epoch == 0:
        return (f"stopped by {signal_name(signum)} before the first epoch ended; no checkpoint was saved. "
                f"Start it again with --resume (--workdir {run.path})")
    where = (f"in epoch {epoch} at step {step} of {steps}; saved a checkpoint of that step"
             if step is not None else f"after epoch {epoch}, whose checkpoint is saved")
    return (f"stopped by {signal_name(signum)} {where}. Continue it with --resume "
            f"(--workdir {run.path}): it picks up exactly there")


def _divergence(out: EpochResult, val: Optional[dict], epoch: int, steps: int,
                max_loss: Optional[float]) -> Optional[dict]:
    """Where the run diverged: a training step's loss not finite or above ``max_loss``, or a
    validation loss not finite; None when it did not."""
    if out.bad_step is not None:
        return {"epoch": epoch, "step": out.bad_step + 1, "steps_per_epoch": steps, "where": "training",
                "loss": out.bad_loss, "max_loss": max_loss}
    if not math.isfinite(val["loss"]):
        return {"epoch": epoch, "where": "validation", "loss": val["loss"]}
    return None


def _diverged_message(d: dict, history: list, callbacks: EpochCallbacks, state, run: RunFolder,
                      restored: bool = False) -> str:
    loss = d.get("loss")
    what = (f"{loss:.4g} is above max_loss {d['max_loss']:g}" if loss is not None and math.isfinite(loss)
            else f"{loss} is not finite")
    at = f" at step {d['step']} of {d['steps_per_epoch']}" if d["where"] == "training" else ""
    lr = float(f"{get_learning_rate(state.opt_state):.7g}")
    kept = (f"The run it was to overwrite in {run.path} is back, unchanged." if restored else
            f"Kept: checkpoints up to epoch {history[-1]['epoch']} (latest) and the best, epoch "
            f"{callbacks.best_epoch}; {run.path / 'summary.json'} says so." if history else
            "No checkpoint was written (it diverged in its first epoch).")
    return (f"the {d['where']} loss diverged in epoch {d['epoch']}{at}: {what}; "
            f"try a lower learning rate than {lr:g}. {kept}")


def _summary(history: list[dict], callbacks: EpochCallbacks, test: Optional[dict], dataset, last_epoch: int,
             wall_time_s: float, diverged: Optional[dict], *, num_train: int, best_epoch: int) -> dict:
    """``best_epoch``: the epoch whose weights were tested (0: none)."""
    best_row = next((r for r in history if r["epoch"] == best_epoch), None)
    summary = {
        "best_epoch": best_epoch, "stopped_early": callbacks.should_stop, "stop_epoch": last_epoch,
        "best_val_loss": best_row["val_loss"] if best_row else None,
        "best_val_accuracy": best_row["val_accuracy"] if best_row else None,
        "test_loss": test["loss"] if test else None, "test_accuracy": test["accuracy"] if test else None,
        "num_test": test["count"] if test else None,
        "wall_time_s": wall_time_s, "dataset": dataset.name, "num_train": num_train,
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}"
                  + (f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""),
    }
    if diverged:
        summary["diverged"] = diverged
    return summary
