"""Host-side epoch callbacks with Keras' semantics: early stopping and reduce-LR-on-plateau.

Both watch a value to minimise (validation loss) once per epoch, keep their whole state in
plain Python numbers (``state_dict`` / ``load_state_dict``, JSON-serialisable, saved in
every checkpoint so ``--resume`` continues them exactly), and never touch device arrays:
the loop acts on what they decide. They work for negative values too (optax's
``reduce_on_plateau`` does not: optax PR 1767).
"""

from __future__ import annotations

import math
from typing import Optional


def _check(name: str, value, *, minimum, integer=False, below=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum
    if integer:
        ok = ok and isinstance(value, int)
    if below is not None:
        ok = ok and value < below
    if not ok or (isinstance(value, float) and math.isnan(value)):
        what = "an int" if integer else "a number"
        rng = f">= {minimum}" + (f" and < {below}" if below is not None else "")
        raise ValueError(f"{name}={value!r}; must be {what} {rng}")


class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` epochs (Keras' ``EarlyStopping``).

    An epoch improves when ``value < best - min_delta``. After ``update`` returns,
    ``should_stop`` tells the loop to stop; with ``patience=5`` and the best value at epoch
    ``e``, training stops after epoch ``e + 5``. ``best_epoch`` names the weights to restore
    (the loop keeps them, as ``restore_best_weights=True``).

    ``start_from_epoch`` (Keras' argument of that name): the first epochs are a warm-up in which
    the run is never stopped; epochs without improvement count from epoch ``start_from_epoch + 1``
    on. Unlike Keras, the best value is tracked during the warm-up too (the best checkpoint is
    the best validation loss of the whole run).
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0, start_from_epoch: int = 0):
        _check("EarlyStopping: patience", patience, minimum=0, integer=True)
        _check("EarlyStopping: min_delta", min_delta, minimum=0.0)
        _check("EarlyStopping: start_from_epoch", start_from_epoch, minimum=0, integer=True)
        self.patience, self.min_delta, self.start_from_epoch = patience, float(min_delta), start_from_epoch
        self.best = math.inf
        self.best_epoch = 0
        self.wait = 0
        self.stopped_epoch = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch`` (1-based) with monitored ``value``; returns True if it is the new best."""
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"EarlyStopping: monitored value is NaN at epoch {epoch}")
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, int(epoch), 0
            return True
        if epoch <= self.start_from_epoch:  # warming up: no epoch counts against the run yet
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = int(epoch)
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_epoch > 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_epoch = float(d["best"]), int(d["best_epoch"])
        self.wait, self.stopped_epoch = int(d["wait"]), int(d["stopped_epoch"])


class ReduceLROnPlateau:
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement
    (Keras' ``ReduceLROnPlateau``: ``min_delta`` absolute, ``cooldown``, ``min_lr``).

    With ``patience=3`` and the best value at epoch ``e``, the rate is reduced after epoch
    ``e + 3`` (and again 3 epochs later if nothing improves). ``start_from_epoch``: no epoch up
    to it counts as one without improvement (a warm-up, as for :class:`EarlyStopping`).
    """

    def __init__(self, factor: float = 0.5, patience: int = 3, min_delta: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0, start_from_epoch: int = 0):
        _check("ReduceLROnPlateau: factor", factor, minimum=0.0, below=1.0)
        if factor == 0:
            raise ValueError("ReduceLROnPlateau: factor=0; must be in (0, 1)")
        _check("ReduceLROnPlateau: patience", patience, minimum=0, integer=True)
        _check("ReduceLROnPlateau: min_delta", min_delta, minimum=0.0)
        _check("ReduceLROnPlateau: cooldown", cooldown, minimum=0, integer=True)
        _check("ReduceLROnPlateau: min_lr", min_lr, minimum=0.0)
        _check("ReduceLROnPlateau: start_from_epoch", start_from_epoch, minimum=0, integer=True)
        self.start_from_epoch = start_from_epoch
        self.factor, self.patience, self.min_delta = float(factor), patience, float(min_delta)
        self.cooldown, self.min_lr = cooldown, float(min_lr)
        self.best = math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def update(self, epoch: int, value: float, lr: float) -> float:
        """Record epoch ``epoch``'s monitored ``value``; returns the learning rate for the next epoch."""
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"ReduceLROnPlateau: monitored value is NaN at epoch {epoch}")
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
        elif self.cooldown_counter == 0 and epoch > self.start_from_epoch:
            self.wait += 1
            if self.wait >= self.patience and lr > self.min_lr:
                self.cooldown_counter, self.wait = self.cooldown, 0
                return max(lr * self.factor, self.min_lr)
        return lr

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.wait, self.cooldown_counter = float(d["best"]), int(d["wait"]), int(d["cooldown_counter"])


class EpochCallbacks:
    """Early stopping and reduce-LR-on-plateau as ``fit`` runs them: both watch the validation
    loss once per epoch; their state is saved in every checkpoint (``state_dict``). ``plateau``
    None: the learning rate is never changed here (a schedule in the train step sets it)."""

    def __init__(self, early: EarlyStopping, plateau: Optional[ReduceLROnPlateau]):
        self.early, self.plateau = early, plateau

    @classmethod
    def from_config(cls, config) -> "EpochCallbacks":
        """From a ``FitConfig``'s ``early_stopping_patience``, ``plateau_*`` / ``min_lr`` and
        ``warmup_epochs`` (both callbacks' ``start_from_epoch``); with ``lr_schedule="cosine"``, no
        reduce-LR-on-plateau (the schedule is the train step's)."""
        warmup = config.warmup_epochs
        plateau = None if config.lr_schedule == "cosine" else ReduceLROnPlateau(
            factor=config.plateau_factor, patience=config.plateau_patience, min_delta=config.plateau_min_delta,
            min_lr=config.min_lr, start_from_epoch=warmup)
        return cls(EarlyStopping(patience=config.early_stopping_patience, start_from_epoch=warmup), plateau)

    def update(self, epoch: int, val_loss: float, lr: float) -> tuple[bool, float]:
        """``(improved, next_lr)`` after epoch ``epoch``: whether it is the new best, the next rate."""
        improved = self.early.update(epoch, val_loss)
        return improved, lr if self.plateau is None else self.plateau.update(epoch, val_loss, lr)

    @property
    def should_stop(self) -> bool:
        return self.early.should_stop

    @property
    def best_epoch(self) -> int:
        return self.early.best_epoch

    def state_dict(self) -> dict:
        return {"early_stopping": self.early.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.early.load_state_dict(d["early_stopping"])
        if self.plateau is not None:
            self.plateau.load_state_dict(d["plateau"])
