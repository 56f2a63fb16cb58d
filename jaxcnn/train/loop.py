"""``fit``: the epoch loop — device-resident data, jitted steps, callbacks, checkpoints, records.

The whole dataset lives on the device(s) as uint8 (replicated over the ``data`` mesh);
each epoch draws a permutation from ``fold_in(shuffle_key, epoch)`` and gathers batches
there, sharded over the mesh. Training drops the last incomplete batch (every example is
seen in other epochs); evaluation pads the last batch and masks it, so every example
counts exactly once. After every epoch: validation, early stopping and
reduce-LR-on-plateau (host-side, Keras' rules), a ``latest`` checkpoint (and ``best`` when
the validation loss improved), ``history.json`` / ``history.csv`` and TensorBoard.
At the end the best weights are restored and the test set is evaluated once.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcnn import checkpoint as ckpt_lib  # module import: jaxcnn.checkpoint imports jaxcnn.train too
from jaxcnn.train import callbacks as cb
from jaxcnn.train import sharding
from jaxcnn.train.state import TrainState, get_learning_rate, set_learning_rate
from jaxcnn.train.steps import make_eval_step, make_train_step

HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "epoch_time_s", "images_per_s")
# Config fields that may change between a run and its --resume (everything else must match).
RESUMABLE_CHANGES = frozenset({"epochs", "data_dir"})


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """What ``fit`` reads. Experiments subclass it and add their own fields (all saved to config.json).

    Defaults are the seed's: Adam 1e-3 (the optimizer is the caller's, see ``jaxcnn.train.adam``),
    batch 64, up to 50 epochs, early stopping patience 5 on validation loss with the best
    weights restored, LR × 0.5 after 3 epochs without improvement, Keras' augmentation.
    """

    epochs: int = 50
    batch_size: int = 64
    eval_batch_size: int = 500
    learning_rate: float = 1e-3
    seed: int = 0
    augment: bool = True
    rotation: float = 15.0
    width_shift: float = 0.1
    height_shift: float = 0.1
    horizontal_flip: bool = True
    early_stopping_patience: int = 5
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    plateau_min_delta: float = 1e-4
    min_lr: float = 0.0
    keep_checkpoints: int = 3

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name}={v!r}; must be an int >= 1")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"{type(self).__name__}: learning_rate={self.learning_rate!r}; must be > 0")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def augment_fn_from_config(config: FitConfig) -> Optional[Callable]:
    """``random_augment`` with the config's ranges, or None when ``config.augment`` is False."""
    return _augment_fn(_augment_settings(config))


def _augment_fn(settings: Optional[tuple]) -> Optional[Callable]:
    if settings is None:
        return None
    from jaxcnn.data.augment import random_augment

    rotation, width_shift, height_shift, horizontal_flip = settings
    return functools.partial(random_augment, rotation=rotation, width_shift=width_shift,
                             height_shift=height_shift, horizontal_flip=horizontal_flip)


def _augment_settings(config: FitConfig) -> Optional[tuple]:
    if not config.augment:
        return None
    return (float(config.rotation), float(config.width_shift), float(config.height_shift), bool(config.horizontal_flip))


# The default steps are built once per setting: runs in one process (tests, studies) whose
# model and optimizer objects are the same then share the compiled step.
@functools.lru_cache(maxsize=16)
def _default_train_step(augment: Optional[tuple]) -> Callable:
    return jax.jit(make_train_step(augment_fn=_augment_fn(augment)), donate_argnums=0)


@functools.lru_cache(maxsize=1)
def _default_eval_step() -> Callable:
    return jax.jit(make_eval_step())


def shuffle_key(seed: int) -> jax.Array:
    """The key of the epoch permutations (epoch ``e`` uses ``fold_in(shuffle_key(seed), e)``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x5EED)


# --------------------------------------------------------------------------- evaluation


def pad_split(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> dict:
    """Device arrays of a split padded to a multiple of ``batch_size``, with a ``mask`` of real rows."""
    n = images.shape[0]
    total = max(1, math.ceil(n / batch_size)) * batch_size
    pad = total - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return sharding.replicate({"image": images, "label": labels, "mask": mask}, mesh)


def evaluate(state: TrainState, padded: dict, eval_step: Callable, batch_size: int, mesh) -> dict:
    """``{"loss", "accuracy", "count"}`` over a split from ``pad_split`` (every real example once).

    ``eval_step`` must be the jitted step (``jax.jit(make_eval_step())``).
    """
    take = _slicer(mesh, batch_size)
    sums = None
    for start in range(0, padded["label"].shape[0], batch_size):
        out = eval_step(state, take(padded, start))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count, "count": int(count)}


@functools.lru_cache(maxsize=None)
def _slicer(mesh, batch_size: int):
    @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
    def take(arrays, start):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch_size), arrays)

    return take


@functools.lru_cache(maxsize=None)
def _gatherer(mesh, batch_size: int):
    @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
    def take(arrays, perm, i):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,)
        return jax.tree.map(lambda a: a[idx], arrays)

    return take


# --------------------------------------------------------------------------- records


def _write_history(workdir: pathlib.Path, history: list[dict]) -> None:
    (workdir / "history.json").write_text(json.dumps(history, indent=1))
    with open(workdir / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def _device_name() -> str:
    return f"{jax.devices()[0].platform} x{jax.device_count()}"


def _check_resume_config(workdir: pathlib.Path, config: dict) -> None:
    path = workdir / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if diff:
        raise ValueError("resume: the config differs from the run's saved config.json in "
                         + ", ".join(f"{k} ({saved.get(k)!r} -> {config.get(k)!r})" for k in diff)
                         + "; only " + ", ".join(sorted(RESUMABLE_CHANGES)) + " may change on resume")


# --------------------------------------------------------------------------- fit


def fit(state: TrainState, dataset, config: FitConfig, workdir, *, train_step: Optional[Callable] = None,
        eval_step: Optional[Callable] = None, mesh=None, resume: bool = False, progress: bool = True,
        extra_config: Optional[dict] = None) -> tuple[TrainState, list[dict], dict]:
    """Train ``state`` on ``dataset`` (a ``jaxcnn.data.Dataset``) and record the run in ``workdir``.

    Args:
      state: a fresh ``TrainState`` (when resuming: one built the same way, used as the template).
        It is consumed: the jitted step donates its buffers, so keep a copy
        (``jax.tree.map(np.array, state.params)``) if you need the initial values afterwards.
      dataset: ``train`` / ``val`` / ``test`` splits of uint8 ``(N, H, W, C)`` images, int32 labels.
      config: a ``FitConfig`` (or subclass); saved, with ``extra_config``, to ``config.json``.
      workdir: run directory (created). A workdir that already holds checkpoints is refused
        unless ``resume`` (then the run continues from its latest checkpoint, exactly).
      train_step, eval_step: unjitted step functions; defaults ``make_train_step(augment_fn=...)``
        from the config and ``make_eval_step()``. Pass your own for frozen parameters
        (``make_train_step(labels=...)``) or another preprocessing.
      mesh: a 1-D ``data`` mesh (default: all devices); batch sizes must divide by its size.
      progress: show a tqdm bar per epoch.

    Returns:
      ``(state, history, summary)``: the state with the **best** weights restored, the list of
      per-epoch dicts (``HISTORY_FIELDS``) and the summary dict also written to ``summary.json``.
    """
    t_start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_batch_size(config.batch_size, mesh, name="batch_size")
    sharding.check_batch_size(config.eval_batch_size, mesh, name="eval_batch_size")
    n_train = len(dataset.train.labels)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"fit: batch_size={config.batch_size} is larger than the training set ({n_train} examples)")

    run_config = {**config.to_dict(), **(extra_config or {})}
    if ckpt_lib.has_checkpoints(workdir) and not resume:
        raise FileExistsError(f"{workdir} already holds checkpoints of a run; continue it with resume "
                              f"(--resume), or choose another workdir (nothing was changed)")
    if resume:
        _check_resume_config(workdir, run_config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(run_config, indent=1, default=str))

    train_step = (_default_train_step(_augment_settings(config)) if train_step is None
                  else jax.jit(train_step, donate_argnums=0))
    eval_step = _default_eval_step() if eval_step is None else jax.jit(eval_step)
    early = cb.EarlyStopping(patience=config.early_stopping_patience)
    plateau = cb.ReduceLROnPlateau(factor=config.plateau_factor, patience=config.plateau_patience,
                                   min_delta=config.plateau_min_delta, min_lr=config.min_lr)
    state = sharding.replicate(state, mesh)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    history: list[dict] = []
    start_epoch, wall_before = 0, 0.0
    best_vars = None
    if resume and ckpts.latest_epoch() is not None:
        state, meta = ckpts.restore(state, "latest")
        history, start_epoch, wall_before = meta["history"], int(meta["epoch"]), float(meta["wall_time_s"])
        early.load_state_dict(meta["early_stopping"])
        plateau.load_state_dict(meta["plateau"])
        if ckpts.latest_epoch("best") is not None:
            best, _ = ckpts.restore(state, "best")
            best_vars = (best.params, best.batch_stats)

    train_data = sharding.replicate({"image": dataset.train.images, "label": dataset.train.labels}, mesh)
    val_data = pad_split(dataset.val.images, dataset.val.labels, config.eval_batch_size, mesh)
    gather = _gatherer(mesh, config.batch_size)
    s_key = shuffle_key(config.seed)

    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(workdir / "tensorboard"))
    try:
        epoch = start_epoch
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if early.should_stop:
                break
            t0 = time.perf_counter()
            lr = get_learning_rate(state.opt_state)
            perm = jax.device_put(jax.random.permutation(jax.random.fold_in(s_key, epoch), n_train),
                                  sharding.replicated(mesh))
            sums = {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                       disable=not progress, leave=True, dynamic_ncols=True)
            for i in range(steps_per_epoch):
                state, metrics = train_step(state, gather(train_data, perm, i))
                sums = jax.tree.map(jnp.add, sums, metrics)
                if (i + 1) % 20 == 0 or i + 1 == steps_per_epoch:
                    done = i + 1
                    m = jax.device_get(sums)
                    bar.set_postfix(loss=f"{m['loss'] / done:.4f}", acc=f"{m['accuracy'] / done:.4f}",
                                    img_s=f"{done * config.batch_size / (time.perf_counter() - t0):.0f}")
                    bar.update(done - bar.n)
            bar.close()
            train_time = time.perf_counter() - t0
            m = jax.device_get(sums)
            val = evaluate(state, val_data, eval_step, config.eval_batch_size, mesh)
            row = {"epoch": epoch, "train_loss": float(m["loss"]) / steps_per_epoch,
                   "train_accuracy": float(m["accuracy"]) / steps_per_epoch,
                   "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "lr": float(f"{lr:.7g}"),  # the float32 rate, without float32's decimal noise
                   "epoch_time_s": time.perf_counter() - t0,
                   "images_per_s": steps_per_epoch * config.batch_size / train_time}
            history.append(row)
            improved = early.update(epoch, val["loss"])
            if improved:  # copies: the next train step donates (invalidates) state's buffers
                best_vars = jax.tree.map(jnp.copy, (state.params, state.batch_stats))
            new_lr = plateau.update(epoch, val["loss"], lr)
            if new_lr != lr:
                state = set_learning_rate(state, new_lr)
            meta = {"epoch": epoch, "history": history, "early_stopping": early.state_dict(),
                    "plateau": plateau.state_dict(), "wall_time_s": wall_before + time.perf_counter() - t_start}
            ckpts.save(epoch, state, meta, best=improved)
            _write_history(workdir, history)
            for k in HISTORY_FIELDS[1:]:
                tb.add_scalar(k, row[k], epoch)
            tb.flush()
        last_epoch = history[-1]["epoch"] if history else epoch
    finally:
        tb.close()
        ckpts.close()

    if best_vars is not None:
        state = state.replace(params=best_vars[0], batch_stats=best_vars[1])
    test_data = pad_split(dataset.test.images, dataset.test.labels, config.eval_batch_size, mesh)
    test = evaluate(state, test_data, eval_step, config.eval_batch_size, mesh)
    best_row = next((r for r in history if r["epoch"] == early.best_epoch), None)
    summary = {
        "best_epoch": early.best_epoch, "stopped_early": early.should_stop, "stop_epoch": last_epoch,
        "best_val_loss": best_row["val_loss"] if best_row else None,
        "best_val_accuracy": best_row["val_accuracy"] if best_row else None,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "num_test": test["count"],
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "dataset": getattr(dataset, "name", "?"), "num_train": n_train, "device": _device_name(),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return state, history, summary
