"""Weight EMA (``FitConfig.ema_decay``): the train step's average against a float64 hand recurrence, a run
stopped and resumed against the uninterrupted one, the reported and restored weights against the EMA's own
forward pass, and a run without EMA writing the checkpoints it wrote before EMA existed."""

import dataclasses
import math
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import inference, metrics
from jaxcnn.data import Dataset, Split
from jaxcnn.errors import RunInterrupted
from jaxcnn.models import CifarCNN
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import FitConfig, Steps, TrainState, adam, fit, recipe, state_to_tree
from jaxcnn.train.feed import train_plan
from jaxcnn.train.lr_find import lr_find
from jaxcnn.train.state import ema_view, with_ema
from jaxcnn.train.steps import advance_ema, make_train_step

EPS32 = float(np.finfo(np.float32).eps)
MOMENTUM = 0.9  # the tiny model's BatchNorm momentum


def _model():
    return CifarCNN(num_classes=3, widths=(4,), dense_units=4, conv_dropout="none", dense_dropout=0.0,
                    bn_momentum=MOMENTUM)


def _state(seed: int = 0) -> TrainState:
    model = _model()
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-2), key=jax.random.key(1))


def _f64(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(a, np.float64) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------------- the train step's average


def test_the_ema_after_k_train_steps_is_the_float64_recurrence_over_the_weights_the_steps_made():
    """k steps from the initial weights (Keras' ``use_ema`` starts there): ``ema_k = d ema_{k-1} + (1 - d) w_k``
    in float64 over the params and BatchNorm statistics each step produced. Float32: each step rounds two
    products, their sum and the two coefficients (<= 1.5 eps of the largest magnitude M of that entry), and the
    earlier errors shrink by d, so after k steps the EMA is within 1.5 k eps M; held to 2 k eps M."""
    decay, k = 0.8, 6
    state = with_ema(_state())
    rng = np.random.default_rng(0)
    step = jax.jit(make_train_step(ema_decay=decay))  # (no donation: each step's weights are read below)
    want = _f64({"params": state.params, "batch_stats": state.batch_stats})
    scale = {n: np.abs(v) for n, v in want.items()}
    for _ in range(k):
        batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3)), jnp.uint8),
                 "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
        state, _ = step(state, batch)
        new = _f64({"params": state.params, "batch_stats": state.batch_stats})
        want = {n: decay * want[n] + (1 - decay) * new[n] for n in want}
        scale = {n: np.maximum(scale[n], np.maximum(np.abs(new[n]), np.abs(want[n]))) for n in want}
    got = _f64(state.ema)
    assert got.keys() == want.keys() and any("batch_stats" in n for n in got)
    for n in want:
        tol = 2 * k * EPS32 * scale[n]
        assert np.all(np.abs(got[n] - want[n]) <= tol), (n, np.abs(got[n] - want[n]).max())
    # the average is not the last weights (a step that copied them would pass a looser check)
    last = _f64({"params": state.params, "batch_stats": state.batch_stats})
    assert max(np.abs(got[n] - last[n]).max() for n in got) > 1e3 * EPS32


def test_with_gradient_accumulation_the_ema_moves_only_at_the_steps_that_update_the_weights():
    """k = 2 (``optax.MultiSteps``): the weights change at steps 2 and 4 only, and so does the EMA: after
    4 steps it is the float64 recurrence over those two updates' weights (the statistics of the update's
    step), within the bound above; after the steps in between it is the one before, bitwise."""
    from jaxcnn.train.state import accumulate_gradients

    decay = 0.8
    state = with_ema(accumulate_gradients(_state(), 2))
    rng = np.random.default_rng(1)
    step = jax.jit(make_train_step(ema_decay=decay))
    want = _f64({"params": state.params, "batch_stats": state.batch_stats})
    scale = {n: np.abs(v) for n, v in want.items()}
    for i in range(1, 5):
        before = jax.tree.map(np.asarray, state.ema)
        batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3)), jnp.uint8),
                 "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
        state, _ = step(state, batch)
        if i % 2:  # accumulating: neither the weights' average nor its statistics move
            assert all(a.tobytes() == np.asarray(b).tobytes() for a, b in
                       zip(jax.tree.leaves(before), jax.tree.leaves(state.ema))), i
            continue
        new = _f64({"params": state.params, "batch_stats": state.batch_stats})
        want = {n: decay * want[n] + (1 - decay) * new[n] for n in want}
        scale = {n: np.maximum(scale[n], np.maximum(np.abs(new[n]), np.abs(want[n]))) for n in want}
    got = _f64(state.ema)
    for n in want:
        assert np.all(np.abs(got[n] - want[n]) <= 2 * 2 * EPS32 * scale[n]), (n, np.abs(got[n] - want[n]).max())


def test_an_entry_equal_to_its_new_value_keeps_its_ema_exactly():
    """A frozen layer's weights never move: their EMA stays them bit for bit (the plain float32 update,
    ``0.1 x + 0.9 x``, is x rounded differently for many x)."""
    x = {"w": jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float32)}
    plain = recipe.ema_update({"params": x, "batch_stats": {}}, {"params": x, "batch_stats": {}}, 0.9)
    assert np.any(np.asarray(plain["params"]["w"]) != np.asarray(x["w"]))  # (so the check below can fail)
    got = advance_ema({"params": x, "batch_stats": {}}, x, {}, 0.9)
    assert np.asarray(got["params"]["w"]).tobytes() == np.asarray(x["w"]).tobytes()


# --------------------------------------------------------------------------- a run with an EMA


def _data() -> Dataset:
    rng = np.random.default_rng(2)

    def split(n):
        return Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    return Dataset(name="synthetic", train=split(48), val=split(16), test=split(16), num_classes=3,
                   class_names=("a", "b", "c"))


#: 2 epochs of 3 steps (48 / 16); precise BatchNorm over 2 batches, re-estimated for the EMA's weights.
CONFIG = FitConfig(epochs=2, batch_size=16, eval_batch_size=8, augment=None, seed=3, precise_bn_batches=2,
                   ema_decay=0.7)


class _SignalsItself:
    """The run's train step, which sends SIGTERM to this process before global step ``at`` (through the
    real handler, as a user's would)."""

    def __init__(self, inner, at: int):
        self.inner, self.lower, self.at = inner, inner.lower, at

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(state, batch)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run with ``CONFIG``: ``(workdir, summary)``."""
    workdir = tmp_path_factory.mktemp("ema") / "whole"
    _, _, summary = fit(_state(), _data(), CONFIG, workdir, progress=False)
    return workdir, summary


def _tree(workdir, which: str = "latest") -> dict:
    with RunFolder(workdir).checkpoints(read_only=True) as ckpts:
        tree, _ = ckpts.restore(which)
    return tree


def test_a_run_with_an_ema_stopped_mid_epoch_and_resumed_is_the_uninterrupted_one(whole, tmp_path):
    """SIGTERM during global step 5 (epoch 2's second of 3; the run stops after it), then ``resume``:
    bitwise the uninterrupted run's latest and best checkpoints (raw weights, optimizer and EMA), history
    and test scores."""
    from test_reliability import assert_same_run

    cut = tmp_path / "cut"
    steps = Steps.build(CONFIG)
    with pytest.raises(RunInterrupted, match="in epoch 2 at step 2 of 3"):
        fit(_state(), _data(), CONFIG, cut, progress=False,
            steps=dataclasses.replace(steps, train=_SignalsItself(steps.train, 4)))
    with RunFolder(cut).checkpoints(read_only=True) as ckpts:
        assert ckpts.all_epochs("interrupted") == [5]
        tree, _ = ckpts.restore("interrupted", 5)
    assert set(tree["ema"]) == {"params", "batch_stats"}  # the mid-epoch EMA is saved
    _, _, summary = fit(_state(), _data(), CONFIG, cut, progress=False, resume=True)
    assert not (RunFolder(cut).checkpoint_dir / "damaged").exists()  # it resumed from step 5, not epoch 1
    assert_same_run(cut, whole[0], 2)
    a, b = _f64(_tree(cut, "best")), _f64(_tree(whole[0], "best"))
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert (summary["test_loss"], summary["test_accuracy"]) == (whole[1]["test_loss"], whole[1]["test_accuracy"])


def _logits64(variables, images) -> np.ndarray:
    return np.asarray(_model().apply(variables, jnp.asarray(images, jnp.float32) / 255, train=False), np.float64)


def test_validation_test_scores_and_restore_are_the_emas(whole):
    """The history's validation loss, the summary's test loss and ``inference.restore``'s logits are those of
    the checkpoint's EMA (weights and statistics), not of its raw weights; the BatchNorm statistics of the EMA
    are re-estimated for the EMA's weights (precise BatchNorm), the raw weights' are the train step's."""
    from test_precise_bn import _np_block1

    workdir, summary = whole
    data = _data()
    history = RunFolder(workdir).read_history()
    latest = _tree(workdir)
    ema = {"params": latest["ema"]["params"], "batch_stats": latest["ema"]["batch_stats"]}
    raw = {"params": latest["params"], "batch_stats": latest["batch_stats"]}
    # the last epoch's validation loss: the EMA's, within float32's rounding of a 3-class log-softmax
    val_ema = metrics.nll(_logits64(ema, data.val.images), data.val.labels)
    val_raw = metrics.nll(_logits64(raw, data.val.images), data.val.labels)
    assert abs(history[-1]["val_loss"] - val_ema) <= 1e-5 * (1 + val_ema)
    assert abs(val_raw - val_ema) > 1e-3  # (so the check above tells them apart)
    # the reported weights are the best epoch's EMA: restored as they are, and the test scores are theirs
    best = _tree(workdir, "best")
    run = inference.restore(workdir)
    assert summary["weights"] == "ema"
    for name, tree in (("params", best["ema"]["params"]), ("batch_stats", best["ema"]["batch_stats"])):
        got, want = _f64(run.variables[name]), _f64(tree)
        assert got.keys() == want.keys() and all(got[n].tobytes() == want[n].tobytes() for n in got), name
    logits = run.predict(data.test.images, return_logits=True).astype(np.float64)
    want = _logits64({"params": best["ema"]["params"], "batch_stats": best["ema"]["batch_stats"]}, data.test.images)
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))
    raw_logits = _logits64({"params": best["params"], "batch_stats": best["batch_stats"]}, data.test.images)
    assert np.abs(raw_logits - want).max() > 1e-2
    test_ema = metrics.nll(want, data.test.labels)
    assert abs(summary["test_loss"] - test_ema) <= 1e-5 * (1 + test_ema)
    assert summary["test_accuracy"] == float(np.mean(want.argmax(-1) == data.test.labels))
    # precise BatchNorm: the EMA's statistics are the float64 mean over epoch 2's first 2 batches of the EMA
    # weights' activations (as tests/test_precise_bn.py holds them); the raw statistics are not those
    rows = train_plan(CONFIG.seed, 2, 48, 16)[:2]
    for k, name in enumerate(("block1_bn1", "block1_bn2")):
        acts = [_np_block1(ema["params"], data.train.images[r])[k] for r in rows]
        want_mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], 0)
        amplify = (1 + MOMENTUM) / (1 - MOMENTUM)
        got = np.asarray(ema["batch_stats"][name]["mean"], np.float64)
        assert np.all(np.abs(got - want_mean) <= 64 * EPS32 * amplify * (np.abs(want_mean) + 1e-3)), name
        assert np.abs(np.asarray(raw["batch_stats"][name]["mean"], np.float64) - want_mean).max() > 1e-3


def test_the_report_says_the_weights_are_the_emas(tmp_path, monkeypatch):
    """The confusion and calibration titles of the end-of-run report, and of the report made again from the
    folder (``results.write_test_results``), name the EMA and its decay, the curves' title and the summary's
    ``recipe`` list it; a run without one says none of it."""
    from jaxcnn import results, viz

    titles = []
    for name in ("plot_confusion", "plot_reliability"):
        real = getattr(viz, name)
        monkeypatch.setattr(viz, name, lambda *a, _real=real, **kw: (titles.append(kw["title"]), _real(*a, **kw))[1])
    curves = []
    monkeypatch.setattr(viz, "plot_curves", lambda *a, _real=viz.plot_curves, **kw: (curves.append(kw["title"]),
                                                                                     _real(*a, **kw))[1])
    config = dataclasses.replace(CONFIG, epochs=1)
    fit(_state(), _data(), config, tmp_path / "ema", progress=False)
    results.write_test_results(tmp_path / "ema", _data())
    assert len(titles) == 4 and all(t.endswith(", EMA weights (decay 0.7))") for t in titles), titles
    assert curves == ["ema: training curves (EMA 0.7)"] * 2
    assert RunFolder(tmp_path / "ema").read_summary()["recipe"] == ["EMA 0.7"]
    titles.clear()
    fit(_state(), _data(), dataclasses.replace(config, ema_decay=0.0), tmp_path / "plain", progress=False)
    results.write_test_results(tmp_path / "plain", _data())
    assert len(titles) == 4 and not any("EMA" in t for t in titles), titles
    assert curves[2:] == ["plain: training curves"] * 2
    assert "recipe" not in RunFolder(tmp_path / "plain").read_summary()


# --------------------------------------------------------------------------- off, and refused


def test_without_ema_the_checkpoint_and_summary_are_what_they_were(tmp_path):
    """``ema_decay=0`` (the default): the checkpoint tree has the keys it had before EMA existed, the state has
    no EMA, and the summary no ``weights``."""
    config = dataclasses.replace(CONFIG, ema_decay=0.0, epochs=1, precise_bn_batches=0)
    state, _, summary = fit(_state(), _data(), config, tmp_path / "run", progress=False)
    assert set(_tree(tmp_path / "run")) == {"step", "params", "batch_stats", "opt_state", "key"}
    assert set(state_to_tree(_state())) == {"step", "params", "batch_stats", "opt_state", "key"}
    assert state.ema == {} and "weights" not in summary and "recipe" not in summary  # (the seed's recipe)
    assert RunFolder(tmp_path / "run").read_config()["fit"]["ema_decay"] == 0.0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, math.nan, math.inf, True, "0.9", None])
def test_a_decay_outside_0_1_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=rf"^FitConfig: ema_decay={re.escape(repr(bad))}; must be 0 \(off\) or a "
                                         rf"number in \(0, 1\)$"):
        FitConfig(ema_decay=bad)
    with pytest.raises(ValueError, match=rf"^make_train_step: ema_decay={re.escape(repr(bad))}; must be 0"):
        make_train_step(ema_decay=bad)


def test_steps_and_states_that_do_not_match_the_ema_setting_are_refused():
    with pytest.raises(ValueError, match=r"the steps apply ema_decay=0.0 but the FitConfig says ema_decay=0.9"):
        Steps.build(FitConfig()).check(FitConfig(ema_decay=0.9))
    batch = {"image": jnp.zeros((2, 8, 8, 3), jnp.uint8), "label": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ValueError, match=r"train_step: ema_decay=0.9 but the state has no EMA; add it with "
                                         r"jaxcnn.train.state.with_ema\(state\)"):
        make_train_step(ema_decay=0.9)(_state(), batch)
    state = with_ema(_state())
    assert ema_view(state).ema == {} and ema_view(_state()).ema == {}
    assert with_ema(state, False).ema == {}



def test_the_lr_finder_sweeps_the_steps_of_a_config_with_an_ema():
    """(Its steps update an EMA, so the swept copy of the state gets one.)"""
    lrs, losses = lr_find(_state(), _data(), dataclasses.replace(CONFIG, ema_decay=0.9), num_steps=10,
                          progress=False)
    assert len(losses) >= 1 and np.isfinite(losses[0])
