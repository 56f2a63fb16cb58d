"""``FitConfig``: what ``jaxcnn.train.fit`` reads, validated when built.

The learning rate is not here: it lives in the optimizer (``jaxcnn.train.adam``, an
``optax.inject_hyperparams`` state), and ``fit`` records it from there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from jaxcnn.data.augment import AugmentConfig
from jaxcnn.preprocess import PREPROCESS


#: ``FitConfig.class_weight``'s values.
CLASS_WEIGHTS = (None, "balanced")

#: ``FitConfig.lr_schedule``'s values.
LR_SCHEDULES = ("plateau", "cosine")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The loop's settings (saved as the ``"fit"`` section of a run's ``config.json``).

    Defaults are the seed's: batch 64, up to 50 epochs, early stopping with patience 5 on the
    validation loss (best weights restored), learning rate × 0.5 after 3 epochs without
    improvement, Keras' augmentation, inputs scaled to [0, 1].

    Attributes:
      epochs: the most epochs to train (>= 1).
      batch_size: global training batch (a multiple of the device count).
      eval_batch_size: validation / test batch (a multiple of the device count).
      seed: epoch order (``fold_in(shuffle_key(seed), epoch)``); the model's init and the
        step keys come from the ``TrainState`` the caller builds.
      augment: on-device augmentation ranges, or None for none.
      preprocess: ``"unit"`` (``x / 255``) or ``"caffe"`` (Keras' ResNet50 mode); the run
        records it, so inference applies the same.
      early_stopping_patience: epochs without a better validation loss before stopping (>= 0).
      plateau_factor, plateau_patience, plateau_min_delta, min_lr: reduce-LR-on-plateau (with
        ``lr_schedule="plateau"``; unused with ``"cosine"``).
      lr_schedule: ``"plateau"`` (the seed's: the optimizer's learning rate, lowered by
        reduce-LR-on-plateau) or ``"cosine"``: warm-up + cosine (``recipe.warmup_cosine``; Goyal
        et al. 2017, Loshchilov & Hutter 2017), the rate at optimizer step ``t`` is the
        optimizer's rate times ``f(t)``, rising linearly from 0 over the ``warmup_epochs`` and
        then falling along a half cosine to 0 at the end of the ``epochs``. It depends on the step
        only (a resumed run is the uninterrupted one); reduce-LR-on-plateau is off, early stopping
        is as configured. The history's ``lr`` is the rate of each epoch's last step. A resume
        that changes ``epochs`` stretches the schedule of the steps still to do.
      keep_checkpoints: how many latest epochs to keep on disk (the best is kept apart).
      class_weight: None (every example counts the same) or ``"balanced"``: each example's loss is
        weighted by ``n / (K * n_c)`` of its class (``n_c`` of the ``n`` training examples;
        Keras' ``class_weight``, sklearn's "balanced"), so an imbalanced training set's minority
        classes count as much as the majority's.
      max_loss: a training step's loss above this, or not finite, stops the run as diverged (the
        softmax cross-entropy of a uniform guess is ln K: 2.3 for 10 classes); None: no limit
        (a loss that is not finite still stops it). The validation loss stops it only when it is
        not finite: a finite spike (BatchNorm statistics still settling) is not divergence.
      warmup_epochs: the first epochs are a warm-up in which neither early stopping nor the
        plateau schedule counts an epoch without improvement (their ``start_from_epoch``); the
        best checkpoint is still the best validation loss of the whole run. 0: no warm-up. With
        ``lr_schedule="cosine"`` they are also the learning rate's warm-up (< ``epochs``).
      precise_bn_batches: 0 (off), or re-estimate the BatchNorm population statistics over that
        many training batches with the weights fixed before each validation evaluation
        (precise BatchNorm, ``jaxcnn.train.precise_bn``). The estimate replaces the moving
        statistics (as pycls does): the checkpoints hold it, the best weights are tested with
        it, and training continues from it. The batches are the first ones of the epoch just
        trained (they depend on (seed, epoch) only, so a resumed run is the uninterrupted one):
        at most the epoch's batches, so ``fit`` uses and records the epoch's when asked for more,
        and says so in one line.
      label_smoothing: ``s`` in [0, 1): train on ``(1 - s) one_hot + s / K`` (Szegedy et al. 2016;
        Keras' ``label_smoothing``); the validation and test losses stay plain cross-entropy.
      mixup_alpha, cutmix_alpha: > 0 mixes each training batch, after augmentation, with itself in
        reverse order, ``lam ~ Beta(alpha, alpha)``: mixup blends whole images, cutmix pastes a box;
        both > 0: one of the two per batch at random (timm's ``Mixup``). 0: off.
      ema_decay: 0 (off), or ``d`` in (0, 1): an exponential moving average of the weights and of
        the BatchNorm statistics, ``ema = d * ema + (1 - d) * new`` after every optimizer step
        (``recipe.ema_update``), started at the initial weights (Keras' ``use_ema``; 0.999 is usual:
        an average over about ``1 / (1 - d)`` steps). The EMA is what the run evaluates and reports:
        the validation loss (so early stopping, the plateau schedule and the best checkpoint), the test
        scores and report (``summary.json``'s ``"weights": "ema"``), ``jaxcnn.inference.restore``
        (and so predict and export). Training goes on from the raw weights; the checkpoints hold
        both (``TrainState.ema``), so a resume is the uninterrupted run. With ``precise_bn_batches``
        the statistics are re-estimated for the EMA's weights and replace the EMA's statistics (the
        raw weights' moving statistics, which nothing evaluates, are left as training made them).
      flip_tta: horizontal-flip test-time augmentation (``jaxcnn.tta``): every evaluation of the run,
        the validation of each epoch (so early stopping, reduce-LR-on-plateau and the best
        checkpoint too) and the end-of-run test scores and report, predicts with the mean of the
        softmaxes of each image and its left-right mirror (the loss: the cross-entropy of that
        mean). Training is unchanged. ``jaxcnn.inference.restore(run).predict`` then predicts the
        same way by default. False: one view.
      grad_accum_steps: ``k`` >= 1; 1 (default): off, the optimizer state and checkpoints as without it.
        ``k`` > 1: gradient accumulation (Keras' ``gradient_accumulation_steps``, ``optax.MultiSteps``):
        each train step still takes one batch of ``batch_size`` (the micro-batch, what fits in memory),
        the gradients of ``k`` consecutive steps are averaged and the optimizer updates the weights once
        every ``k`` steps, so an update sees ``k * batch_size`` examples. Build the state as without it
        (``jaxcnn.train.adam``): ``fit`` wraps its optimizer in ``optax.MultiSteps`` (the setting lives
        here only, and ``fit`` refuses a state whose optimizer already accumulates; the state it returns
        carries the wrapped optimizer). The running mean and the step within the ``k`` are in the
        optimizer state, so in the checkpoints: a run stopped between two updates resumes bitwise. The
        optimizer's own state (learning rate, weight decay) sits inside, so the recorded rate,
        reduce-LR-on-plateau and ``jaxcnn.freeze.masked`` work as without it (the accumulator holds a
        float32 zero for each frozen parameter too). ``state.step`` counts train steps (the step keys
        stay per batch); the update is ``step // k``. With ``lr_schedule="cosine"`` the schedule counts
        updates: train step ``s`` goes into update ``s // k``, at the rate ``lr * f(s // k)``, ``f``
        over ``epochs * steps_per_epoch // k`` updates of which ``warmup_epochs * steps_per_epoch // k``
        warm up; the history's ``lr`` is the rate of the update its epoch's last batch goes into. The
        accumulation runs over the run's steps, not the epoch's: with ``steps_per_epoch`` not a multiple
        of ``k``, an epoch's last partial accumulation carries on into the next epoch, and the run's last
        ``epochs * steps_per_epoch % k`` batches make no update. Not quite one ``k`` times larger batch:
        BatchNorm normalises each micro-batch by its own statistics and updates its running statistics
        every step (as Keras), dropout and augmentation draw per step, and the float32 sums round
        differently.
    """

    epochs: int = 50
    batch_size: int = 64
    eval_batch_size: int = 500
    seed: int = 0
    augment: Optional[AugmentConfig] = AugmentConfig()
    preprocess: str = "unit"
    early_stopping_patience: int = 5
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    plateau_min_delta: float = 1e-4
    min_lr: float = 0.0
    keep_checkpoints: int = 3
    max_loss: Optional[float] = 1e3
    warmup_epochs: int = 0
    precise_bn_batches: int = 0
    class_weight: Optional[str] = None
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    lr_schedule: str = "plateau"
    ema_decay: float = 0.0
    flip_tta: bool = False
    grad_accum_steps: int = 1

    def __post_init__(self):
        name = type(self).__name__
        for field in ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints"):
            v = getattr(self, field)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: {field}={v!r}; must be an int >= 1")
        for field in ("seed", "early_stopping_patience", "plateau_patience", "warmup_epochs", "precise_bn_batches"):
            v = getattr(self, field)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name}: {field}={v!r}; must be an int >= 0")
        if not (isinstance(self.plateau_factor, (int, float)) and 0 < self.plateau_factor < 1):
            raise ValueError(f"{name}: plateau_factor={self.plateau_factor!r}; must be in (0, 1)")
        if self.max_loss is not None and (isinstance(self.max_loss, bool) or not isinstance(self.max_loss, (int, float))
                                          or not math.isfinite(self.max_loss) or self.max_loss <= 0):
            raise ValueError(f"{name}: max_loss={self.max_loss!r}; must be a finite number > 0, or None (no limit)")
        for field in ("plateau_min_delta", "min_lr"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: {field}={v!r}; must be a finite number >= 0")
        if self.augment is not None and not isinstance(self.augment, AugmentConfig):
            raise TypeError(f"{name}: augment={self.augment!r}; must be a jaxcnn.data.AugmentConfig or None")
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{name}: label_smoothing={self.label_smoothing!r}; must be a number in [0, 1)")
        for field in ("mixup_alpha", "cutmix_alpha"):
            v = getattr(self, field)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: {field}={v!r}; must be a finite number >= 0 (0: off)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{name}: lr_schedule={self.lr_schedule!r}; allowed: "
                             f"{', '.join(map(repr, LR_SCHEDULES))}")
        if self.lr_schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise ValueError(f"{name}: warmup_epochs={self.warmup_epochs} with lr_schedule='cosine' and "
                             f"epochs={self.epochs}; the learning rate's warm-up must end before the last epoch "
                             f"(warmup_epochs < epochs)")
        if not _is_number(self.ema_decay) or not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"{name}: ema_decay={self.ema_decay!r}; must be 0 (off) or a number in (0, 1)")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"{name}: class_weight={self.class_weight!r}; allowed: None, 'balanced'")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"{name}: preprocess={self.preprocess!r}; allowed: {', '.join(map(repr, PREPROCESS))}")
        if not isinstance(self.flip_tta, bool):
            raise ValueError(f"{name}: flip_tta={self.flip_tta!r}; must be True (evaluate with the mean of each "
                             f"image's and its mirror's softmax) or False (one view)")
        if not _is_int(self.grad_accum_steps) or self.grad_accum_steps < 1:
            raise ValueError(f"{name}: grad_accum_steps={self.grad_accum_steps!r}; must be an int >= 1 (1: off; k: one "
                             f"optimizer update from the mean gradient of every k batches)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
