"""``fit``: the epoch loop — device-resident data, jitted steps, callbacks, checkpoints, records.

The run folder (``jaxcnn.runfolder.RunFolder``) gets ``config.json`` first (the model's
spec, preprocessing, data, optimizer and loop settings, so any process can rebuild the
model), then after every epoch: a ``latest`` checkpoint (and ``best`` when the validation
loss improved), ``history.json`` / ``.csv`` and TensorBoard scalars; at the end the best
weights are scored once on the test split (and the validation split, for the temperature),
``summary.json`` is written, and the end-of-run report (``jaxcnn.report``: curves, confusion
matrix, most confidently wrong images, reliability diagram, per-class results) from those
scores in memory. What a run holds on its folder while it trains (lock, signals, overwrite
guard, checkpoints, start / resume, TensorBoard) is ``jaxcnn.train.session.RunSession``.

What can go wrong is handled there and here, and said in one sentence:

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

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcnn import metrics, report
from jaxcnn.errors import RunInterrupted, TrainingDiverged
from jaxcnn.models.spec import model_spec, module_of
from jaxcnn.preprocess import get_preprocess
from jaxcnn.runfolder import FORMAT_VERSION, RunFolder
from jaxcnn.signals import signal_name
from jaxcnn.train import sharding
from jaxcnn.train.callbacks import EpochCallbacks
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import Processes
from jaxcnn.train.feed import EvalFeed, TrainFeed, evaluate
from jaxcnn.train.precise_bn import batches_in_epoch, bn_momentum_of, make_reestimate
from jaxcnn.train.session import Best, RunSession
from jaxcnn.train.state import (TrainState, accumulate_gradients, ema_view, get_learning_rate, get_weight_decay,
                                 with_ema)
from jaxcnn.train.steps import Steps, make_logits_fn

log = logging.getLogger("jaxcnn")


__all__ = ["RunInterrupted", "Steps", "TrainingDiverged", "fit", "run_config", "train_epoch"]


def fit(state: TrainState, dataset, config: FitConfig, workdir, *, steps: Optional[Steps] = None, mesh=None,
        processes: Optional[Processes] = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
        model: Optional[nn.Module] = None, experiment: Optional[dict] = None) -> tuple[TrainState, list[dict], dict]:
    """Train ``state`` on ``dataset`` and record the run in the run folder ``workdir``.

    Args:
      state: a fresh ``TrainState`` (when resuming: one built the same way, the template). It
        is consumed: the jitted step donates its buffers (copy what you need first). With
        ``config.grad_accum_steps`` > 1 its optimizer is wrapped here (``accumulate_gradients``).
      dataset: a ``jaxcnn.data.Dataset`` (uint8 ``(N, H, W, C)`` images, int32 labels; its
        splits in memory or streamed from files).
      config: the loop's ``FitConfig`` (the learning rate is the optimizer's).
      workdir: the run folder (created). One that holds checkpoints is refused unless
        ``resume`` (continue exactly from its latest checkpoint) or ``overwrite`` (the old run
        is set aside in ``<workdir>/.previous/``, still taking its disk space, and deleted once
        the new one has saved its first checkpoint; put back if the new one stops before).
      steps: the train and eval steps with the settings they apply (:class:`Steps`); default
        ``Steps.build(config, ...)`` (with ``lr_schedule="cosine"``: ``steps_per_epoch=len(dataset.train)
        // config.batch_size``). Pass ``Steps.build(config, labels)`` to freeze parameters by a
        ``"trainable"``/``"frozen"`` label tree (``jaxcnn.freeze``; build ``state.tx`` with
        ``adam(labels=labels)`` too), or steps compiled once and reused over several runs.
      mesh: a 1-D ``data`` mesh (default: all devices); batch sizes must divide by its size.
      processes: this process among the run's (default ``Processes()``: from ``jax.distributed``).
      progress: a tqdm bar per epoch.
      model: the Flax module, for the model spec in ``config.json``; default: the module
        behind ``state.apply_fn`` (``model.apply``, or a ``functools.partial`` of it).
      experiment: the calling experiment's own settings, saved as ``config["experiment"]``.

    Returns:
      ``(state, history, summary)``: the state with the **best** weights (with ``ema_decay``: the
      EMA's best as its ``params`` and ``batch_stats``, and no ``ema``), the per-epoch
      rows (``HISTORY_FIELDS``), and the summary also written to ``summary.json``, with the
      end-of-run report's fields (``jaxcnn.report``: per-class results, calibration; its plots
      are in ``<workdir>/plots/``).

    Raises:
      ValueError / FileExistsError / FileNotFoundError / jaxcnn.runfolder.RunBusyError: the
        run cannot start (a setting, the folder); nothing was changed.
      jaxcnn.runfolder.NothingToDo: ``resume`` of a run that already has ``config.epochs`` and its report.
      RunInterrupted: SIGINT / SIGTERM; resume continues from the step it stopped at (or writes
        the report a signal after the last epoch stopped).
      TrainingDiverged: the loss diverged; the records and the last good checkpoints stay.
    """
    t_start = time.perf_counter()
    procs = Processes() if processes is None else processes
    mesh = sharding.make_mesh() if mesh is None else mesh
    steps_per_epoch = len(dataset.train) // config.batch_size  # (TrainFeed's)
    steps = Steps.build(config, train_labels=dataset.train.labels, num_classes=dataset.num_classes,
                        steps_per_epoch=steps_per_epoch) if steps is None else steps
    steps.check(config, steps_per_epoch=steps_per_epoch)
    if 1 < config.grad_accum_steps > config.epochs * steps_per_epoch:  # (the cosine's check: Steps.build)
        raise ValueError(f"fit: grad_accum_steps={config.grad_accum_steps} with {config.epochs} epochs of "
                         f"{steps_per_epoch} steps: {config.epochs * steps_per_epoch} train steps make no optimizer "
                         f"update, so the weights would never change; use grad_accum_steps <= "
                         f"{config.epochs * steps_per_epoch} (or more epochs, or a smaller batch_size)")
    state = accumulate_gradients(state, config.grad_accum_steps)  # (k = 1: the state as it is)
    used, note = batches_in_epoch(config.precise_bn_batches, steps_per_epoch,
                                  f"precise_bn_batches={config.precise_bn_batches}")
    if note is not None:  # config.json records the batches the re-estimate uses
        config = dataclasses.replace(config, precise_bn_batches=used)
        if procs.primary:
            log.warning(note)
    state = with_ema(state, bool(config.ema_decay))  # (started at the weights given)
    run = RunFolder(workdir)
    record = run_config(state, dataset, config, model=model, experiment=experiment)
    reestimate = _precise_bn(config, record, state, steps)
    procs.check_same_config(record)
    procs.on_primary(run.check_writable)
    train_feed = TrainFeed(dataset.train, config.batch_size, mesh, seed=config.seed, processes=procs)
    val_feed = EvalFeed(dataset.val, config.eval_batch_size, mesh, processes=procs)
    with RunSession(run, record, config, sharding.replicate(state, mesh), procs, resume=resume, overwrite=overwrite,
                    report_missing=lambda: bool(report.report_missing(run))) as session:
        out = _train(session, steps, train_feed, val_feed, config, progress=progress and procs.primary,
                     wall_s=session.start.wall_s - t_start, reestimate=reestimate)
        if session.end_training():  # diverged before its first checkpoint: the run it was to overwrite is back
            raise TrainingDiverged(_diverged_message(out, session, restored=True), {})
        if not out.diverged and session.signal() is not None:  # (in the last epoch's end)
            raise session.interrupted(out.epoch)  # resume then writes the summary and the report
        state = out.best_state()
        summary = _summary(out, session.callbacks, dataset, out.wall_s + time.perf_counter(),
                           num_train=train_feed.num_examples, ema=bool(config.ema_decay))
        summary = procs.on_primary(lambda: _write_summary_and_report(session, state, dataset, steps, config,
                                                                     out, summary))
    if out.diverged:
        raise TrainingDiverged(_diverged_message(out, session), summary)
    return state, out.history, summary


@dataclasses.dataclass
class Trained:
    """What the epochs of a ``fit`` left: the state, epochs done, history, the best weights, and
    where it diverged (None: it did not)."""

    state: TrainState
    epoch: int
    history: list
    best: Optional[Best]
    diverged: Optional[dict]
    wall_s: float  # add perf_counter() for the run's wall time so far

    def best_state(self) -> TrainState:
        if self.best is None:  # (no epoch's weights kept: the weights it has, as they are evaluated)
            return ema_view(self.state)
        return self.state.replace(params=self.best.params, batch_stats=self.best.batch_stats, ema={})


def _precise_bn(config: FitConfig, record: dict, state: TrainState, steps: Steps) -> Optional[Callable]:
    """``config.precise_bn_batches``' re-estimation (``jaxcnn.train.precise_bn.make_reestimate``),
    or None (off, or a model without BatchNorm); ValueError when the model's momentum is unknown."""
    if not config.precise_bn_batches or not state.batch_stats:
        return None
    return make_reestimate(bn_momentum_of(record["model"]), config.precise_bn_batches,
                           preprocess=get_preprocess(steps.preprocess))


def _train(session: RunSession, steps: Steps, train_feed: TrainFeed, val_feed: EvalFeed, config: FitConfig, *,
           progress: bool, wall_s: float, reestimate: Optional[Callable] = None) -> Trained:
    """The epochs still to do, each ended by ``session.end_epoch``; stops early when the callbacks
    say so, at a signal (RunInterrupted, after saving where it is), or where the loss diverged.

    ``reestimate`` (precise BatchNorm): before each validation, the state's BatchNorm statistics
    are replaced by ``reestimate(state, train_feed, epoch)``; the checkpoints and the best weights
    hold them, so the end-of-run test scores the best weights with the statistics estimated for
    them (re-estimating there would compute the same again). With an EMA (``FitConfig.ema_decay``)
    the weights evaluated, re-estimated for and kept as the best are the EMA's (``ema_view``)."""
    start, accumulate = session.start, _accumulator(config.max_loss)
    out = Trained(start.state, start.epoch, start.history, start.best, None, wall_s)
    position, sums = start.position, start.sums
    while out.epoch < config.epochs and not session.callbacks.should_stop:
        if session.signal() is not None:  # the latest checkpoint is where it stopped
            raise session.interrupted(out.epoch)
        t0 = time.perf_counter()
        ran = train_epoch(out.state, steps.train, train_feed, out.epoch + 1, config.epochs, start=position, sums=sums,
                          accumulate=accumulate, stop=session.stop, progress=progress,
                          lr_scale=None if steps.schedule_steps is None else steps.lr_scale)
        out.state, position, sums = ran.state, 0, None
        if ran.stopped_by is not None:
            session.save_interrupted(out.state, {"epoch": out.epoch, "position": ran.steps_done, "sums": ran.sums,
                                                 "history": out.history, "wall_time_s": wall_s + time.perf_counter()})
            raise session.interrupted(out.epoch + 1, ran.stopped_by, step=ran.steps_done,
                                      steps=train_feed.steps_per_epoch)
        if reestimate is not None and ran.bad_step is None:
            stats = reestimate(ema_view(out.state), train_feed, out.epoch + 1)
            out.state = out.state.replace(ema={**out.state.ema, "batch_stats": stats}) if out.state.ema else \
                out.state.replace(batch_stats=stats)
        val = evaluate(ema_view(out.state), val_feed, steps.eval) if ran.bad_step is None else None
        out.diverged = _divergence(ran, val, out.epoch + 1, train_feed.steps_per_epoch, config.max_loss)
        if out.diverged:
            break
        out.epoch += 1
        row = {**ran.row, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "epoch_time_s": time.perf_counter() - t0}
        out.state, out.best = session.end_epoch(out.epoch, row, out.state, out.best, out.history,
                                                wall_s + time.perf_counter())
    return out


def _write_summary_and_report(session: RunSession, state: TrainState, dataset, steps: Steps, config: FitConfig,
                              out: Trained, summary: dict) -> dict:
    """Process 0: score the reported weights on the test split (and on the validation split, for
    the temperature) once, in this process, write ``summary.json`` with the test scores, then the
    end-of-run report (``jaxcnn.report``) and the summary with its fields. A signal that came
    meanwhile stops it between plots (RunInterrupted: resume completes the report). With
    ``flip_tta`` the scores are the log mean probabilities of each image and its mirror
    (``make_logits_fn``): the test scores, the report and its temperature are the flip average's."""
    run = session.run
    if not session.procs.primary:  # (a process other than 0 writes nothing)
        return summary
    if out.best is None and out.diverged:  # no good epoch: nothing to test
        run.write_summary(summary)
        return summary
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    variables = {k: v for k, v in variables.items() if k == "params" or v}
    logits_fn = make_logits_fn(state.apply_fn, get_preprocess(steps.preprocess), flip_tta=steps.flip_tta)
    test_logits = _logits(logits_fn, variables, dataset.test, config.eval_batch_size)
    summary = {**summary, **_scores(test_logits, dataset.test.labels)}
    run.write_summary(summary)
    if out.diverged:
        return summary

    def check():
        if session.stop["signal"] is not None:
            raise RunInterrupted(f"stopped by {signal_name(session.stop['signal'])} after the last epoch, while "
                                 f"writing the end-of-run report (test results, plots). Complete it with --resume "
                                 f"(--workdir {run.path})", session.stop["signal"])

    check()
    val_logits = _logits(logits_fn, variables, dataset.val, config.eval_batch_size) if len(dataset.val) else None
    summary = {**summary, **report.write_report(
        run, history=out.history, summary=summary, class_names=dataset.class_names, test_labels=dataset.test.labels,
        test_logits=test_logits, test_images=dataset.test.read, val_logits=val_logits,
        val_labels=None if val_logits is None else dataset.val.labels, check=check,
        lr_schedule=config.lr_schedule, flip_tta=config.flip_tta, ema_decay=config.ema_decay,
        recipe=report.recipe_of(run.read_config()))}
    run.write_summary(summary)
    return summary


def _logits(logits_fn: Callable, variables: dict, split, batch_size: int) -> np.ndarray:
    """float32 ``(N, K)`` logits of every example of ``split``, in batches of ``batch_size`` (the
    last one padded to the same shape: one compilation)."""
    n, outs = len(split), []
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, min(lo + batch_size, n))
        images = split.read(rows)
        if len(rows) < batch_size and n > batch_size:
            images = np.concatenate([images, np.repeat(images[:1], batch_size - len(rows), axis=0)])
        outs.append(np.asarray(logits_fn(variables, images))[:len(rows)])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _scores(logits: np.ndarray, labels) -> dict:
    """``{"test_loss", "test_accuracy", "num_test"}``: the mean softmax cross-entropy (in float64,
    ``jaxcnn.metrics.nll``) and the accuracy of ``logits`` against ``labels``."""
    labels = np.asarray(labels, np.int64)
    return {"test_loss": metrics.nll(logits, labels),
            "test_accuracy": float(np.mean(np.asarray(logits).argmax(-1) == labels)), "num_test": int(len(labels))}


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
                progress: bool = True, lr_scale: Optional[Callable[[int], float]] = None) -> EpochResult:
    """One pass over ``feed``'s batches of epoch ``epoch``, from batch ``start`` with the running
    ``sums`` of a run stopped mid-epoch.

    ``accumulate``: ``_accumulator(max_loss)`` (built once per ``fit``): the epoch stops at the
    next check (every 20 steps) after a step whose loss is not finite or above ``max_loss``
    (``bad_step``: the first such step). ``stop``: ``{"signal": None}``, set by a signal
    handler: the epoch stops after the current step (``stopped_by``). ``lr_scale``: the train
    step's schedule (``Steps.lr_scale``): the row's ``lr`` is the rate of the epoch's last step,
    the optimizer's times ``lr_scale(epoch * steps_per_epoch - 1)``; None: the optimizer's rate.
    """
    t0 = time.perf_counter()
    waited = feed.source.wait_s
    steps = feed.steps_per_epoch
    lr = get_learning_rate(state.opt_state) * (1.0 if lr_scale is None else lr_scale(epoch * steps - 1))
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


def devices() -> str:
    """The devices this run trains on, as ``"cpu x2"`` (``" (2 processes)"`` added for several)."""
    return (f"{jax.devices()[0].platform} x{jax.device_count()}"
            + (f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""))


def run_config(state: TrainState, dataset, config: FitConfig, *, model: Optional[nn.Module] = None,
               experiment: Optional[dict] = None) -> dict:
    """What ``fit`` writes to ``config.json``: enough to rebuild the model, reload the data and
    check a resume, in any process.

    ``{"model": spec, "data": {...}, "optimizer": {"learning_rate", "weight_decay"}, "fit": {...},
    "experiment": {...}, "devices": "cpu x1"}`` (the optimizer's settings read from its state: ``weight_decay``
    0 is Adam; the input preprocessing is ``fit.preprocess``); ``model`` is None when no Flax module is known.
    """
    model = module_of(state.apply_fn) if model is None else model
    sizes = {k: len(getattr(dataset, k)) for k in ("train", "val", "test")}  # every process holds whole splits
    return {
        "format_version": FORMAT_VERSION,
        "model": None if model is None else model_spec(model),
        "data": {"name": dataset.name, "source": dataset.source, "image_shape": list(dataset.image_shape),
                 "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
                 **{f"num_{k}": int(n) for k, n in sizes.items()},
                 **({"fingerprint": dataset.fingerprint} if getattr(dataset, "fingerprint", None) else {})},
        "optimizer": {"learning_rate": float(f"{get_learning_rate(state.opt_state):.7g}"),
                      "weight_decay": float(f"{get_weight_decay(state.opt_state):.7g}")},
        "fit": config.to_dict(),
        "experiment": dict(experiment or {}),
        "devices": devices(),  # of this start (a resume on others warns: jaxcnn.runfolder.RunFolder.prepare)
    }


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


def _diverged_message(out: Trained, session: RunSession, restored: bool = False) -> str:
    d, history, run = out.diverged, out.history, session.run
    loss = d.get("loss")
    what = (f"{loss:.4g} is above max_loss {d['max_loss']:g}" if loss is not None and math.isfinite(loss)
            else f"{loss} is not finite")
    at = f" at step {d['step']} of {d['steps_per_epoch']}" if d["where"] == "training" else ""
    lr = float(f"{get_learning_rate(out.state.opt_state):.7g}")
    kept = (f"The run it was to overwrite in {run.path} is back, unchanged." if restored else
            f"Kept: checkpoints up to epoch {history[-1]['epoch']} (latest) and the best, epoch "
            f"{session.callbacks.best_epoch}; {run.path / 'summary.json'} says so." if history else
            "No checkpoint was written (it diverged in its first epoch).")
    return (f"the {d['where']} loss diverged in epoch {d['epoch']}{at}: {what}; "
            f"try a lower learning rate than {lr:g}. {kept}")


def _summary(out: Trained, callbacks: EpochCallbacks, dataset, wall_time_s: float, *, num_train: int,
             ema: bool = False) -> dict:
    """The summary before the test scores (``test_*`` None until they are added); ``"weights": "ema"``
    when the weights scored are the EMA's (``FitConfig.ema_decay``; absent: the trained weights)."""
    best_epoch = out.best.epoch if out.best is not None else 0  # the epoch whose weights are tested (0: none)
    best_row = next((r for r in out.history if r["epoch"] == best_epoch), None)
    summary = {
        "best_epoch": best_epoch, "stopped_early": callbacks.should_stop, "stop_epoch": out.epoch,
        "best_val_loss": best_row["val_loss"] if best_row else None,
        "best_val_accuracy": best_row["val_accuracy"] if best_row else None,
        "test_loss": None, "test_accuracy": None, "num_test": None,
        "wall_time_s": wall_time_s, "dataset": dataset.name, "num_train": num_train,
        "device": devices(),
    }
    if ema:
        summary["weights"] = "ema"
    if out.diverged:
        summary["diverged"] = out.diverged
    return summary
