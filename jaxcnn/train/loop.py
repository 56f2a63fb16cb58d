"""``fit``: the epoch loop — device-resident data, jitted steps, callbacks, checkpoints, records.

The run folder (``jaxcnn.runfolder.RunFolder``) gets ``config.json`` first (the model's
spec, preprocessing, data, optimizer and loop settings, so any process can rebuild the
model), then after every epoch: a ``latest`` checkpoint (and ``best`` when the validation
loss improved), ``history.json`` / ``.csv`` and TensorBoard scalars; at the end the best
weights are restored, the test set is evaluated once and ``summary.json`` written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxcnn.models.spec import model_spec, module_of
from jaxcnn.preprocess import get_preprocess
from jaxcnn.runfolder import HISTORY_FIELDS, RunFolder
from jaxcnn.train import sharding
from jaxcnn.train.callbacks import EpochCallbacks
from jaxcnn.train.config import FitConfig
from jaxcnn.train.feed import EvalFeed, TrainFeed, evaluate
from jaxcnn.train.state import TrainState, get_learning_rate, set_learning_rate, state_from_tree, state_to_tree
from jaxcnn.train.steps import make_eval_step, make_train_step


def fit(state: TrainState, dataset, config: FitConfig, workdir, *, labels=None,
        train_step: Optional[Callable] = None, eval_step: Optional[Callable] = None, mesh=None,
        resume: bool = False, progress: bool = True, model: Optional[nn.Module] = None,
        experiment: Optional[dict] = None) -> tuple[TrainState, list[dict], dict]:
    """Train ``state`` on ``dataset`` and record the run in the run folder ``workdir``.

    Args:
      state: a fresh ``TrainState`` (when resuming: one built the same way, the template). It
        is consumed: the jitted step donates its buffers (copy what you need first).
      dataset: a ``jaxcnn.data.Dataset`` (uint8 ``(N, H, W, C)`` images, int32 labels).
      config: the loop's ``FitConfig`` (the learning rate is the optimizer's).
      workdir: the run folder (created). One that holds checkpoints is refused unless
        ``resume``; then the run continues exactly from its latest checkpoint.
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
    """
    t_start = time.perf_counter()
    mesh = sharding.make_mesh() if mesh is None else mesh
    train_feed = TrainFeed(dataset.train, config.batch_size, mesh, seed=config.seed)
    val_feed = EvalFeed(dataset.val, config.eval_batch_size, mesh)
    run = RunFolder(workdir)
    run.begin(run_config(state, dataset, config, model=model, experiment=experiment), resume=resume)
    train_step, eval_step = _steps(config, labels, train_step, eval_step)
    callbacks = EpochCallbacks.from_config(config)
    state, epoch, history, best, wall_before = sharding.replicate(state, mesh), 0, [], None, 0.0
    with run.checkpoints(keep=config.keep_checkpoints) as ckpts, run.tensorboard() as tb:
        if resume and ckpts.latest_epoch() is not None:
            state, epoch, history, best, wall_before = _resume(ckpts, state, callbacks)
        while epoch < config.epochs and not callbacks.should_stop:
            epoch += 1
            t0 = time.perf_counter()
            state, row = train_epoch(state, train_step, train_feed, epoch, config.epochs, progress)
            val = evaluate(state, val_feed, eval_step)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], epoch_time_s=time.perf_counter() - t0)
            history.append(row)
            improved, next_lr = callbacks.update(epoch, val["loss"], row["lr"])
            if improved:  # copies: the next train step donates (invalidates) the state's buffers
                best = jax.tree.map(jnp.copy, (state.params, state.batch_stats))
            if next_lr != row["lr"]:
                state = set_learning_rate(state, next_lr)
            meta = {"epoch": epoch, "history": history, **callbacks.state_dict(),
                    "wall_time_s": wall_before + time.perf_counter() - t_start}
            ckpts.save(epoch, state_to_tree(state), meta, best=improved)
            run.write_history(history)
            for k in HISTORY_FIELDS[1:]:
                tb.add_scalar(k, row[k], epoch)
            tb.flush()
    if best is not None:
        state = state.replace(params=best[0], batch_stats=best[1])
    test = evaluate(state, EvalFeed(dataset.test, config.eval_batch_size, mesh), eval_step)
    summary = _summary(history, callbacks, test, dataset, epoch, wall_before + time.perf_counter() - t_start)
    run.write_summary(summary)
    return state, history, summary


def train_epoch(state: TrainState, train_step: Callable, feed: TrainFeed, epoch: int, epochs: int,
                progress: bool = True) -> tuple[TrainState, dict]:
    """One pass over ``feed``'s batches; returns the state and the epoch's training row."""
    t0 = time.perf_counter()
    lr = get_learning_rate(state.opt_state)
    steps = feed.steps_per_epoch
    sums = {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
    with tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress,
              dynamic_ncols=True) as bar:
        for i, batch in enumerate(feed.epoch(epoch)):
            state, metrics = train_step(state, batch)
            sums = jax.tree.map(jnp.add, sums, metrics)
            if (i + 1) % 20 == 0 or i + 1 == steps:  # reading the sums waits for the device
                m = jax.device_get(sums)
                bar.set_postfix(loss=f"{m['loss'] / (i + 1):.4f}", acc=f"{m['accuracy'] / (i + 1):.4f}",
                                img_s=f"{(i + 1) * feed.batch_size / (time.perf_counter() - t0):.0f}")
                bar.update(i + 1 - bar.n)
    m = jax.device_get(sums)
    return state, {"epoch": epoch, "train_loss": float(m["loss"]) / steps,
                   "train_accuracy": float(m["accuracy"]) / steps,
                   "lr": float(f"{lr:.7g}"),  # the float32 rate, without float32's decimal noise
                   "images_per_s": steps * feed.batch_size / (time.perf_counter() - t0)}


def run_config(state: TrainState, dataset, config: FitConfig, *, model: Optional[nn.Module] = None,
               experiment: Optional[dict] = None) -> dict:
    """What ``fit`` writes to ``config.json``: enough to rebuild the model, reload the data and
    check a resume, in any process.

    ``{"model": spec, "data": {...}, "optimizer": {"learning_rate"}, "fit": {...}, "experiment": {...}}``
    (the input preprocessing is ``fit.preprocess``); ``model`` is None when no Flax module is known.
    """
    model = module_of(state.apply_fn) if model is None else model
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    return {
        "model": None if model is None else model_spec(model),
        "data": {"name": dataset.name, "source": dataset.source, "image_shape": list(dataset.image_shape),
                 "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
                 **{f"num_{k}": len(s) for k, s in splits.items()}},
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


def _resume(ckpts, state: TrainState, callbacks: EpochCallbacks):
    """``(state, epoch, history, best, wall_time_s)`` from the latest checkpoint (and the best's weights)."""
    tree, meta = ckpts.restore("latest", target=state_to_tree(state))
    state = state_from_tree(state, tree)
    callbacks.load_state_dict(meta)
    best = None
    if ckpts.latest_epoch("best") is not None:
        best_tree, _ = ckpts.restore("best", target=state_to_tree(state), meta=False)
        best = (best_tree["params"], best_tree["batch_stats"])
    return state, int(meta["epoch"]), list(meta["history"]), best, float(meta["wall_time_s"])


def _summary(history: list[dict], callbacks: EpochCallbacks, test: dict, dataset, last_epoch: int,
             wall_time_s: float) -> dict:
    best_row = next((r for r in history if r["epoch"] == callbacks.best_epoch), None)
    return {
        "best_epoch": callbacks.best_epoch, "stopped_early": callbacks.should_stop, "stop_epoch": last_epoch,
        "best_val_loss": best_row["val_loss"] if best_row else None,
        "best_val_accuracy": best_row["val_accuracy"] if best_row else None,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "num_test": test["count"],
        "wall_time_s": wall_time_s, "dataset": dataset.name, "num_train": len(dataset.train),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
    }
