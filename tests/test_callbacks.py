"""Early stopping and reduce-LR-on-plateau on scripted loss sequences, alone and inside ``fit``."""

import dataclasses
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.runfolder import RunFolder
from jaxcnn.data import Dataset, Split
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.train import (EarlyStopping, FitConfig, ReduceLROnPlateau, RunInterrupted, Steps, TrainState, adam, fit,
                          get_learning_rate, make_eval_step, state_from_tree, state_to_tree)

# val loss per epoch: best at epoch 4, then five epochs without improvement.
SCRIPT = [1.0, 0.8, 0.9, 0.7, 0.75, 0.76, 0.77, 0.78, 0.79, 0.5, 0.4]


def test_early_stopping_fires_patience_epochs_after_the_best():
    es = EarlyStopping(patience=5)
    stopped_at = None
    for epoch, v in enumerate(SCRIPT, start=1):
        es.update(epoch, v)
        if es.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == 9 and es.best_epoch == 4 and es.best == 0.7


# The small folder: a good first epoch, a spike while BatchNorm's statistics settle, then learning.
WARMUP_SCRIPT = [1.17, 2.27, 1.38, 3.80, 6.71, 8.71, 2.0, 1.1, 0.95, 0.87, 0.9, 0.91, 0.92, 0.93, 0.94]


def test_early_stopping_does_not_stop_a_warming_up_run_but_keeps_the_best():
    plain = EarlyStopping(patience=5)
    for epoch, v in enumerate(WARMUP_SCRIPT, start=1):
        plain.update(epoch, v)
        if plain.should_stop:
            break
    assert plain.stopped_epoch == 6 and plain.best_epoch == 1  # today's seed recipe: epoch 1's weights
    warm = EarlyStopping(patience=5, start_from_epoch=6)
    improved = [warm.update(epoch, v) for epoch, v in enumerate(WARMUP_SCRIPT, start=1) if not warm.should_stop]
    # epochs 2-6 do not count; 7, 8, 9 do not beat 1.17 ... 8 (1.1) does, 9 and 10 too; 11-15 wait 5
    assert improved[:8] == [True, False, False, False, False, False, False, True]
    assert warm.best_epoch == 10 and warm.best == 0.87 and warm.stopped_epoch == 15
    # within the warm-up, the best is tracked all the same
    early = EarlyStopping(patience=1, start_from_epoch=3)
    assert [early.update(e, v) for e, v in enumerate([2.0, 1.0, 3.0], start=1)] == [True, True, False]
    assert not early.should_stop and early.best_epoch == 2
    early.update(4, 3.0)
    assert early.should_stop and early.stopped_epoch == 4


def test_plateau_does_not_reduce_during_the_warm_up():
    plain, warm = ReduceLROnPlateau(patience=2), ReduceLROnPlateau(patience=2, start_from_epoch=4)
    lrs_plain, lrs_warm, lr_p, lr_w = [], [], 1.0, 1.0
    for epoch, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=1):
        lr_p, lr_w = plain.update(epoch, v, lr_p), warm.update(epoch, v, lr_w)
        lrs_plain.append(lr_p)
        lrs_warm.append(lr_w)
    assert lrs_plain == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert lrs_warm == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5]  # epochs 5 and 6 count


def test_start_from_epoch_is_validated():
    with pytest.raises(ValueError, match=r"EarlyStopping: start_from_epoch=-1; must be an int >= 0"):
        EarlyStopping(start_from_epoch=-1)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau: start_from_epoch=1.5; must be an int >= 0"):
        ReduceLROnPlateau(start_from_epoch=1.5)


def test_early_stopping_min_delta_and_negative_values():
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert es.update(1, -1.0) is True
    assert es.update(2, -1.05) is False  # better by less than min_delta
    assert es.update(3, -1.2) is True
    es.update(4, -1.2)
    es.update(5, -1.25)
    assert es.should_stop and es.best_epoch == 3


def test_plateau_halves_after_patience_epochs_without_improvement():
    rop = ReduceLROnPlateau(factor=0.5, patience=3)
    lr, lrs = 1e-3, []
    for epoch, v in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.76, 0.77, 0.78, 0.79, 0.80, 0.5], start=1):
        lr = rop.update(epoch, v, lr)
        lrs.append(lr)  # the rate for the next epoch
    # no improvement at epochs 5, 6, 7 -> halved after 7; again after 10 (8, 9, 10).
    assert lrs == [1e-3] * 6 + [5e-4] * 3 + [2.5e-4] * 2


def test_plateau_works_for_negative_values_unlike_optax_contrib():
    """optax PR 1767: optax's reduce_on_plateau never reduces when the value is negative."""
    rop = ReduceLROnPlateau(factor=0.5, patience=2)
    lr = 1.0
    for epoch, v in enumerate([-5.0, -4.0, -4.0], start=1):
        lr = rop.update(epoch, v, lr)
    assert lr == 0.5


def test_plateau_cooldown_and_min_lr():
    # As Keras: the cooldown counter is decremented at the start of an epoch, so cooldown=2 skips one epoch.
    rop = ReduceLROnPlateau(factor=0.1, patience=1, cooldown=2, min_lr=0.05)
    lr, lrs = 1.0, []
    for epoch in range(1, 6):
        lr = rop.update(epoch, 1.0, lr)
        lrs.append(lr)
    # epoch 1 sets best; 2 reduces (1 -> 0.1), 3 cools down, 4 reduces (clipped to min_lr), then it stays.
    assert lrs == [1.0, 0.1, 0.1, 0.05, 0.05]


def test_callback_state_round_trips_through_json():
    es, rop = EarlyStopping(patience=5), ReduceLROnPlateau(patience=3)
    for epoch, v in enumerate(SCRIPT[:6], start=1):
        es.update(epoch, v)
        rop.update(epoch, v, 1.0)
    es2, rop2 = EarlyStopping(patience=5), ReduceLROnPlateau(patience=3)
    es2.load_state_dict(json.loads(json.dumps(es.state_dict())))
    rop2.load_state_dict(json.loads(json.dumps(rop.state_dict())))
    for epoch, v in enumerate(SCRIPT[6:], start=7):
        assert es.update(epoch, v) == es2.update(epoch, v)
        assert rop.update(epoch, v, 1.0) == rop2.update(epoch, v, 1.0)
        assert es.state_dict() == es2.state_dict() and rop.state_dict() == rop2.state_dict()
    # a fresh EarlyStopping serialises its infinite "best" too
    assert math.isinf(json.loads(json.dumps(EarlyStopping().state_dict()))["best"])


@pytest.mark.parametrize("bad", [dict(patience=-1), dict(patience=1.5), dict(min_delta=-0.1)])
def test_early_stopping_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EarlyStopping(**bad)


@pytest.mark.parametrize("bad", [dict(factor=1.0), dict(factor=0.0), dict(patience=-2), dict(min_lr=-1.0)])
def test_plateau_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ReduceLROnPlateau(**bad)


def _tiny_dataset(n_train=32, n_eval=8):
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    return Dataset(name="synthetic", train=split(n_train), val=split(n_eval), test=split(n_eval), num_classes=3,
                   class_names=("a", "b", "c"))


def test_fit_stops_on_script_restores_best_weights_and_keeps_latest_and_best_apart(tmp_path):
    """The eval step reports the scripted loss of the current epoch (from state.step): fit must stop after
    epoch 9, restore epoch 4's weights, halve the LR after epoch 7, and keep latest = 7, 8, 9 and best = 4."""
    steps_per_epoch = 2  # 32 examples, batch 16
    script = jnp.asarray(SCRIPT)
    real_eval = make_eval_step()

    def scripted_eval(state, batch):
        out = real_eval(state, batch)
        epoch = state.step // steps_per_epoch
        return {**out, "loss_sum": script[epoch - 1] * out["count"]}

    model = CifarCNN(widths=(4,), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    config = FitConfig(epochs=len(SCRIPT), batch_size=16, eval_batch_size=8, augment=None)
    initial_kernel = np.array(state.params["logits"]["kernel"])  # fit donates the state it is given
    final, history, summary = fit(state, _tiny_dataset(), config, tmp_path, progress=False,
                                  steps=dataclasses.replace(Steps.build(config), eval=scripted_eval))

    assert [r["epoch"] for r in history] == list(range(1, 10))
    assert [r["val_loss"] for r in history] == pytest.approx(SCRIPT[:9])
    assert [r["lr"] for r in history] == pytest.approx([1e-3] * 7 + [5e-4] * 2)
    assert summary["stopped_early"] and summary["stop_epoch"] == 9 and summary["best_epoch"] == 4
    assert summary["best_val_loss"] == pytest.approx(0.7)

    with RunFolder(tmp_path).checkpoints(read_only=True) as ckpts:
        assert ckpts.all_epochs("latest") == [7, 8, 9] and ckpts.all_epochs("best") == [4]
        tree, meta = ckpts.restore("best", target=state_to_tree(final))
    best = state_from_tree(final, tree)
    assert int(best.step) == 4 * steps_per_epoch and meta["epoch"] == 4
    jax.tree.map(np.testing.assert_array_equal, final.params, best.params)
    jax.tree.map(np.testing.assert_array_equal, final.batch_stats, best.batch_stats)
    assert not np.array_equal(np.asarray(final.params["logits"]["kernel"]), initial_kernel)
    assert json.loads((tmp_path / "summary.json").read_text())["best_epoch"] == 4


def test_fit_does_not_end_a_warming_up_run(tmp_path):
    """FitConfig.warmup_epochs=4: the scripted validation loss is best at epoch 1 and worse after; with patience 2
    the run is not ended before epoch 4 + 2 = 6 (without the warm-up: epoch 3), the LR is halved only after
    epoch 5 (plateau patience 1), and the best weights are still epoch 1's."""
    steps_per_epoch = 2
    script = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.5])
    real_eval = make_eval_step()

    def scripted_eval(state, batch):
        out = real_eval(state, batch)
        return {**out, "loss_sum": script[state.step // steps_per_epoch - 1] * out["count"]}

    model = CifarCNN(widths=(4,), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    config = FitConfig(epochs=8, batch_size=16, eval_batch_size=8, augment=None, early_stopping_patience=2,
                       plateau_patience=1, warmup_epochs=4)
    _, history, summary = fit(state, _tiny_dataset(), config, tmp_path, progress=False,
                              steps=dataclasses.replace(Steps.build(config), eval=scripted_eval))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in history] == pytest.approx([1e-3] * 5 + [5e-4])
    assert summary["stopped_early"] and summary["stop_epoch"] == 6 and summary["best_epoch"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["fit"]["warmup_epochs"] == 4


@pytest.mark.parametrize("field", ["warmup_epochs", "precise_bn_batches"])
def test_warmup_and_precise_bn_settings_are_validated(field):
    with pytest.raises(ValueError, match=rf"FitConfig: {field}=-1; must be an int >= 0"):
        FitConfig(**{field: -1})


# --------------------------------------------------------------------------- with the warm-up + cosine schedule


def _tiny_state(weight_decay=0.0):
    model = CifarCNN(widths=(4,), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3, weight_decay=weight_decay),
                             key=jax.random.key(1))


def _cosine(t, total, warm):
    """float64: the rate's factor at optimizer step t (0-based)."""
    return t / warm if t < warm else (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2


def test_a_cosine_run_records_the_rate_of_each_epochs_last_step_and_the_plateau_leaves_it(tmp_path, monkeypatch):
    """lr_schedule="cosine" over 6 epochs of 2 steps, 1 of warm-up: the history's lr is 1e-3 * f(2e - 1);
    the scripted validation loss gets worse after epoch 1, so a plateau of patience 1 would halve the rate
    after epoch 2, and does not; early stopping (patience 2) still ends the run after epoch 3."""
    from jaxcnn import viz

    script = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    real_eval = make_eval_step()

    def scripted_eval(state, batch):
        out = real_eval(state, batch)
        return {**out, "loss_sum": script[state.step // 2 - 1] * out["count"]}

    curves = []
    real_curves = viz.plot_curves
    monkeypatch.setattr(viz, "plot_curves", lambda *a, **k: curves.append(real_curves(*a, **k)) or curves[-1])
    config = FitConfig(epochs=6, batch_size=16, eval_batch_size=8, augment=None, early_stopping_patience=2,
                       plateau_patience=1, warmup_epochs=1, lr_schedule="cosine")
    final, history, summary = fit(_tiny_state(), _tiny_dataset(), config, tmp_path, progress=False,
                                  steps=dataclasses.replace(Steps.build(config, steps_per_epoch=2), eval=scripted_eval))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert summary["stopped_early"] and summary["stop_epoch"] == 3 and summary["best_epoch"] == 1
    for r in history:  # f in float32 (a few ulps of 1), the rate written with 7 significant digits
        want = 1e-3 * _cosine(2 * r["epoch"] - 1, 12, 2)
        assert abs(r["lr"] - want) <= 1e-3 * 4 * 2.0 ** -23 + 5e-7 * want, (r["epoch"], r["lr"], want)
    assert history[0]["lr"] == 5e-4 and history[1]["lr"] < 1e-3
    with RunFolder(tmp_path).checkpoints(read_only=True) as ckpts:
        tree, meta = ckpts.restore("latest", target=state_to_tree(final))
    assert meta["plateau"] is None
    assert get_learning_rate(state_from_tree(final, tree).opt_state) == float(np.float32(1e-3))  # never halved
    assert json.loads((tmp_path / "config.json").read_text())["fit"]["lr_schedule"] == "cosine"
    assert curves[-1].axes[2].lines[0].get_label() == "learning rate (warm-up + cosine)"
    # the report made again from the folder alone (jaxcnn.results) says it too, from config.json
    from jaxcnn import results

    results.write_test_results(tmp_path, _tiny_dataset())
    assert len(curves) == 2 and curves[-1].axes[2].lines[0].get_label() == "learning rate (warm-up + cosine)"


class _SignalsAt:
    """A train step that sends SIGINT to this process before global step ``at``."""

    def __init__(self, inner, at: int):
        self.inner, self.lower, self.at = inner, inner.lower, at

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(state, batch)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_a_cosine_run_resumed_after_epoch_1_is_the_uninterrupted_run_bit_for_bit(tmp_path, weight_decay):
    """2 epochs of 4 steps, 1 of warm-up, Adam or AdamW: stopped by a signal after epoch 1 (at its last
    step) and resumed, the run ends with the uninterrupted run's state, history and scores."""
    config = FitConfig(epochs=2, batch_size=8, eval_batch_size=8, warmup_epochs=1, lr_schedule="cosine")
    data = _tiny_dataset()
    _, history, summary = fit(_tiny_state(weight_decay), data, config, tmp_path / "a", progress=False)
    steps = Steps.build(config, steps_per_epoch=4)
    with pytest.raises(RunInterrupted, match="after epoch 1"):
        fit(_tiny_state(weight_decay), data, config, tmp_path / "b", progress=False,
            steps=dataclasses.replace(steps, train=_SignalsAt(steps.train, 3)))
    _, history2, summary2 = fit(_tiny_state(weight_decay), data, config, tmp_path / "b", progress=False, resume=True)

    def latest(workdir):
        template = _tiny_state(weight_decay)
        with RunFolder(workdir).checkpoints(read_only=True) as c:
            tree, meta = c.restore("latest", target=state_to_tree(template))
        return tree, meta

    (a, meta_a), (b, meta_b) = latest(tmp_path / "a"), latest(tmp_path / "b")
    assert int(a["step"]) == int(b["step"]) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in h]  # noqa: E731
    assert strip(history2) == strip(history) and history[1]["lr"] < history[0]["lr"]
    assert meta_a["plateau"] is meta_b["plateau"] is None and meta_a["early_stopping"] == meta_b["early_stopping"]
    assert (summary2["test_loss"], summary2["test_accuracy"]) == (summary["test_loss"], summary["test_accuracy"])
    recorded = json.loads((tmp_path / "b" / "config.json").read_text())["optimizer"]
    assert recorded == {"learning_rate": 1e-3, "weight_decay": weight_decay}
    assert inference.restore(tmp_path / "b").epoch == summary2["best_epoch"]


def test_a_resume_with_another_weight_decay_is_refused_naming_it(tmp_path):
    config = FitConfig(epochs=1, batch_size=16, eval_batch_size=8, augment=None)
    fit(_tiny_state(0.05), _tiny_dataset(), config, tmp_path, progress=False)
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"optimizer.weight_decay \(0.05 -> 0.0\)"):
        fit(_tiny_state(0.0), _tiny_dataset(), dataclasses.replace(config, epochs=2), tmp_path, progress=False,
            resume=True)
    assert (tmp_path / "config.json").read_bytes() == before
