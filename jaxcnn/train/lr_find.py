"""The learning-rate finder (fastai's ``lr_find``; Smith 2017): a short sweep before training.

The sweep trains a **copy** of a fresh state for ``num_steps`` updates with the learning rate
rising exponentially from ``start`` to ``end`` (:func:`lr_grid`), one rate per update, on the
batches and with the train step that ``jaxcnn.train.fit`` would use (the same ``TrainFeed``
and mesh, ``Steps.build(config, ...)``: augmentation, preprocessing, class weights, soft
targets as in the run). With ``grad_accum_steps`` k an update is k train steps at one rate, as
in the run (its loss: their mean). The sweep sets the rate itself, so a warm-up + cosine
schedule is left out of it (:func:`sweep_config`): the suggestion is then the schedule's peak.
It stops early once a loss is not finite or above 4x the lowest so far (the sweep diverged).
The suggestion is ``jaxcnn.train.recipe.suggest_learning_rate``'s.

:func:`find_learning_rate` is what the training commands' ``--lr_find`` runs: the sweep, the
plot ``<folder>/lr_find.png`` (loss against learning rate, the suggestion marked) and the one
line ``suggested --learning_rate X: why``. Nothing else is written: no checkpoint, no
``config.json``, no history; the caller's state is left as it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
from typing import Optional

import jax
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from jaxcnn import viz
from jaxcnn.runfolder import nearest_existing, write_refused
from jaxcnn.train import sharding
from jaxcnn.train.config import FitConfig
from jaxcnn.train.distributed import Processes
from jaxcnn.train.feed import TrainFeed
from jaxcnn.train.recipe import suggest_learning_rate
from jaxcnn.train.state import (TrainState, accumulate_gradients, check_learning_rate, set_learning_rate,
                                with_ema)
from jaxcnn.train.steps import Steps

#: The plot's file name in the folder ``find_learning_rate`` writes to (the only file it writes).
PLOT = "lr_find.png"
#: A loss above this multiple of the lowest so far ends the sweep (fastai's ``lr_find``).
DIVERGED = 4.0


def lr_grid(start: float, end: float, num_steps: int) -> np.ndarray:
    """float64 ``(num_steps,)``: ``start * (end / start) ** (i / (num_steps - 1))``, from ``start``
    to ``end``; step ``i`` of the sweep trains at rate ``i``."""
    check_learning_rate(start, "lr_find: start")
    check_learning_rate(end, "lr_find: end")
    if not end > start:
        raise ValueError(f"lr_find: end={end!r} must be above start={start!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 10:
        raise ValueError(f"lr_find: num_steps={num_steps!r}; must be an int >= 10 (the suggestion smooths over "
                         f"at least 5 steps)")
    return start * (end / start) ** (np.arange(num_steps, dtype=np.float64) / (num_steps - 1))


def sweep_config(config: FitConfig) -> FitConfig:
    """The ``FitConfig`` the sweep trains with: ``config`` with ``lr_schedule="plateau"``. The sweep
    sets the rate itself at every update; a warm-up + cosine factor would scale it (and its steps
    depend on a run's length, which the sweep does not have), so the rate suggested for a cosine
    run is its peak (``--learning_rate``)."""
    return config if config.lr_schedule == "plateau" else dataclasses.replace(config, lr_schedule="plateau")


def _copy(state: TrainState) -> TrainState:
    """A copy of ``state`` in buffers of its own (the train step donates its argument's)."""
    return jax.tree.map(lambda a: a.copy(), state)


def lr_find(state: TrainState, dataset, config: FitConfig, *, start: float = 1e-7, end: float = 10.0,
            num_steps: int = 200, steps: Optional[Steps] = None, mesh=None, processes: Optional[Processes] = None,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sweep the learning rate over ``num_steps`` updates on a copy of ``state``.

    Args:
      state: a fresh ``TrainState`` whose optimizer keeps its rate in its state
        (``jaxcnn.train.adam``: ``inject_hyperparams``); it is not changed.
      dataset, config, steps, mesh, processes: as ``jaxcnn.train.fit`` takes them; the batches
        are those of ``fit``'s first epochs (``TrainFeed`` with ``config.seed``), on and on over
        epochs when the sweep is longer than one. The sweep trains with :func:`sweep_config`
        (``steps``, when given, must be built from it); with ``config.grad_accum_steps`` k the
        copy's optimizer accumulates as ``fit``'s does and each rate is held for k train steps.
      start, end: the first and the last rate (:func:`lr_grid`).

    Returns:
      ``(lrs, losses)``, float64 ``(k,)`` with ``k <= num_steps``: the rate of each step taken
      (the grid's first ``k``; the step computes in the float32 nearest) and its training loss.
      The sweep stops after the first loss that is not finite or above ``DIVERGED`` times the
      lowest before it (that loss is the last one returned).
    """
    lrs = lr_grid(start, end, num_steps)
    config = sweep_config(config)
    k = config.grad_accum_steps
    procs = Processes() if processes is None else processes
    mesh = sharding.make_mesh() if mesh is None else mesh
    steps = Steps.build(config, train_labels=dataset.train.labels, num_classes=dataset.num_classes) \
        if steps is None else steps
    steps.check(config)
    feed = TrainFeed(dataset.train, config.batch_size, mesh, seed=config.seed, processes=procs)
    swept = sharding.replicate(_copy(with_ema(accumulate_gradients(state, k), bool(steps.ema_decay))), mesh)
    # (the steps' EMA: unused here)
    losses, lowest = [], math.inf
    batches = (b for epoch in itertools.count(1) for b in feed.epoch(epoch))
    updates = zip(*[batches] * k)  # k consecutive batches an update
    with tqdm(total=num_steps, desc="lr_find", unit="update", disable=not progress, dynamic_ncols=True) as bar:
        for lr, group in zip(lrs, updates):
            swept = set_learning_rate(swept, float(lr))
            total = 0.0
            for batch in group:
                swept, metrics = steps.train(swept, batch)
                total += float(metrics["loss"])  # (the device's global mean: the same on every process)
            loss = total / k
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.2g}", loss=f"{loss:.4f}")
            if not math.isfinite(loss) or loss > DIVERGED * lowest:
                break
            lowest = min(lowest, loss)
    return lrs[:len(losses)], np.asarray(losses, np.float64)


def plot_lr_find(lrs, losses, path, *, suggestion: Optional[float] = None) -> pathlib.Path:
    """The sweep's loss against its learning rate (log x), ``suggestion`` marked, as a PNG at
    ``path`` (``jaxcnn.viz.save_figure``); losses that are not finite are left out."""
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    ok = np.isfinite(losses)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(lrs[ok], losses[ok], color="tab:blue", label="training loss")
    ax.set_xscale("log")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.2g}")
        ax.plot([suggestion], [np.interp(np.log(suggestion), np.log(lrs[ok]), losses[ok])], "o", color="tab:red")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"learning-rate sweep ({len(lrs)} updates, one rate each)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return viz.save_figure(fig, path)


def check_folder(folder) -> None:
    """ValueError unless ``folder`` can take the sweep's plot without touching anything else: it
    is absent, empty, or holds only an earlier ``lr_find.png`` (a run there is never disturbed),
    and it can be written."""
    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--lr_find: {folder} is a file, not a folder; give --workdir a folder for {PLOT}")
    others = sorted(p.name for p in folder.iterdir() if p.name != PLOT) if folder.is_dir() else []
    if others:
        raise ValueError(f"--lr_find: {folder} already holds {', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}; the sweep writes only {PLOT} into a new or empty "
                         f"folder, so that no run is disturbed: give --workdir another folder (nothing was changed)")
    where = nearest_existing(folder)
    why = write_refused(where)
    if why is not None:
        raise ValueError(f"--lr_find: {folder} cannot be written: {where} does not take a new file ({why})")


def find_learning_rate(state: TrainState, dataset, config: FitConfig, folder, *, flag: str = "--learning_rate",
                       num_steps: int = 200, start: float = 1e-7, end: float = 10.0, steps: Optional[Steps] = None,
                       mesh=None, processes: Optional[Processes] = None, progress: bool = True) -> tuple[float, str]:
    """``--lr_find``: :func:`lr_find`, the plot ``<folder>/lr_find.png`` (process 0 writes it) and
    the suggestion. Returns ``(lr, line)``, ``line`` being ``"suggested <flag> <lr>: <why>"``.

    Raises ValueError (after the plot, without a mark) when the sweep gives no suggestion: the
    loss did not fall, or it diverged within the first steps.
    """
    procs = Processes() if processes is None else processes
    path = pathlib.Path(folder) / PLOT
    lrs, losses = lr_find(state, dataset, config, start=start, end=end, num_steps=num_steps, steps=steps,
                          mesh=mesh, processes=procs, progress=progress and procs.primary)
    try:
        if len(lrs) < 10:
            raise ValueError(f"the loss diverged after {len(lrs)} updates, at lr {lrs[-1]:.2g} (loss "
                             f"{losses[-1]:.4g}); sweep more steps (--lr_find_steps): each then raises the rate less")
        lr, why = suggest_learning_rate(lrs, losses)
    except ValueError as e:
        if procs.primary:
            plot_lr_find(lrs, losses, path)
        raise ValueError(f"--lr_find: no suggestion: {str(e).removeprefix('suggest_learning_rate: ')} (the sweep: "
                         f"{path})") from None
    if procs.primary:
        plot_lr_find(lrs, losses, path, suggestion=lr)
    return lr, f"suggested {flag} {lr:.2g}: {why}"
