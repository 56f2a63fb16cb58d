"""Gradient accumulation (``FitConfig.grad_accum_steps``, ``optax.MultiSteps``): k micro-batches make the
update of their concatenation (float64 oracle), a run stopped between two updates resumes bitwise, the
cosine schedule counts updates, bad values are refused in one line, and k = 1 changes nothing."""

import dataclasses
import json
import math
import os
import re
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from float64_oracle import EPS32, float32_sum_tolerance
from jaxcnn.data import Dataset, Split
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import (FitConfig, RunInterrupted, Steps, TrainState, accumulate_gradients, adam, fit,
                          get_learning_rate, make_train_step, state_to_tree)

K = 3  # micro-batches to an update
B = 4  # the micro-batch


class MLP(nn.Module):
    """Flatten, Dense(6), tanh, Dense(3): no BatchNorm, no dropout, smooth, so the step's arithmetic is
    exactly a function of the batch and its float64 gradient is written out below."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = jnp.tanh(nn.Dense(6, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="out")(h)


def _mlp_state(tx):
    model = MLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 2)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=tx, key=jax.random.key(1))


def _micro_batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (B, 2, 2, 2), dtype=np.uint8),
             "label": rng.integers(0, 3, B).astype(np.int32)} for _ in range(n)]


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}


def _float64(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _grad64(params, batch):
    """float64 gradient of the mean cross-entropy of ``MLP`` over ``batch``, and each entry's term norm
    (the 2-norm of its N per-example terms, float64_oracle's ``||terms||_2``)."""
    w1, b1 = params["hidden"]["kernel"], params["hidden"]["bias"]
    w2, b2 = params["out"]["kernel"], params["out"]["bias"]
    n = len(batch["label"])
    x = batch["image"].reshape(n, -1).astype(np.float64) / 255.0  # (N, 8)
    h = np.tanh(x @ w1 + b1)  # (N, 6)
    z = h @ w2 + b2
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dz = (p - np.eye(3)[batch["label"]]) / n  # (N, 3)
    da = (dz @ w2.T) * (1 - h ** 2)  # (N, 6)
    grads = {"hidden": {"kernel": x.T @ da, "bias": da.sum(0)}, "out": {"kernel": h.T @ dz, "bias": dz.sum(0)}}
    norms = {"hidden": {"kernel": np.sqrt((x ** 2).T @ da ** 2), "bias": np.sqrt((da ** 2).sum(0))},
             "out": {"kernel": np.sqrt((h ** 2).T @ dz ** 2), "bias": np.sqrt((dz ** 2).sum(0))}}
    return grads, norms


# The float32 gradient as a chain of sums (float64_oracle): forward x @ W1 (8 terms), h @ W2 (6), the
# softmax (3), backward dz @ W2.T (3), then each micro-batch's mean (B terms) and MultiSteps' running mean
# over the K micro-batches (K steps, each adding one rounding of the running value); the k = 1 step on the
# K-times larger batch: its mean over K * B.
ACCUMULATED_SUMS = (8, 6, 3, 3, B, K)
BIG_BATCH_SUMS = (8, 6, 3, 3, K * B)


def _grad_tolerance(grad64, norm, n_terms):
    return float32_sum_tolerance(n_terms, norm + np.abs(grad64))


def _run(state, batches):
    step = jax.jit(make_train_step(), donate_argnums=0)
    for batch in batches:
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return state


def test_k_accumulated_sgd_steps_make_the_step_of_the_concatenated_batch():
    """SGD (linear in the gradient: a sum in place of the mean, or the last micro-batch alone, is off by
    the gradient's size): after K micro-steps the weights moved by -lr * the float64 gradient of the K
    micro-batches concatenated, within the float32 gradient's tolerance times lr plus the rounding of the
    weights themselves (eps * |p|); before the K-th they did not move at all. The k = 1 step on the
    concatenated batch meets the same oracle at its own tolerance."""
    lr = 0.5
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    batches = _micro_batches(K)
    p0 = jax.tree.map(np.array, _mlp_state(sgd).params)
    g64, norms = _grad64(_float64(p0), _concat(batches))

    partial = _run(accumulate_gradients(_mlp_state(sgd), K), batches[:K - 1])
    for a, b in zip(jax.tree.leaves(partial.params), jax.tree.leaves(p0)):
        assert np.asarray(a).tobytes() == b.tobytes()  # no update before the K-th micro-batch
    assert (int(partial.opt_state.mini_step), int(partial.opt_state.gradient_step)) == (K - 1, 0)

    accumulated = _run(accumulate_gradients(_mlp_state(sgd), K), batches)
    assert (int(accumulated.opt_state.mini_step), int(accumulated.opt_state.gradient_step)) == (0, 1)
    big = _run(_mlp_state(sgd), [_concat(batches)])
    for got, sums in ((accumulated, ACCUMULATED_SUMS), (big, BIG_BATCH_SUMS)):
        for path, p in jax.tree_util.tree_leaves_with_path(p0):
            keys = [k.key for k in path]
            new = np.asarray(got.params[keys[0]][keys[1]], np.float64)
            oracle = -lr * g64[keys[0]][keys[1]]
            tol = lr * _grad_tolerance(g64[keys[0]][keys[1]], norms[keys[0]][keys[1]], sums) + EPS32 * np.abs(new)
            err = np.abs((new - p) - oracle)  # (new - p: exact in float64)
            assert np.all(err <= tol), (keys, np.max(err / tol))


def _adam64(params, grads_fn, updates, lr, *, weight_decay=0.0, moves=None, b1=0.9, b2=0.999, eps=1e-8):
    """float64 Adam / AdamW (optax.adam's and optax.adamw's formulas: ``p -= lr * (r + wd * p)`` for the
    kernels, ``r = m_hat / (sqrt(v_hat) + eps)``) from ``params``, ``updates`` steps of the float64 gradient
    ``grads_fn(params)``; ``moves``: a tree of bools, False for a frozen parameter. Each step's gradient
    tolerance (``grads_fn``'s second value, per entry) is carried to the weights through Adam's derivative:
    returns ``(params, tolerance)``.

    The hyperparameters are float32 numbers, as the float32 step's are (0.999 in float32 is 1.3e-8 off:
    1 - b2 then differs by 1.3e-5 of itself). What float32 still rounds is added to the tolerance: the
    bias corrections ``1 - b^t`` (``b^t`` within a few eps of 1, so ``4 eps / (1 - b^t)`` of themselves:
    3e-5 for ``1 - b2^2``, the largest term here; v_hat's counts half, through the square root), the
    few operations of ``r`` (6 eps of it), and the update's subtraction (eps of ``|p| + lr |r|``)."""
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    lr, b1, b2, weight_decay = f32(lr), f32(b1), f32(b2), f32(weight_decay)
    params = _float64(params)
    moves = jax.tree.map(lambda p: True, params) if moves is None else moves
    gs, tols, bound = [], [], jax.tree.map(np.zeros_like, params)
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    for t in range(1, updates + 1):
        g, tol = grads_fn(params)
        gs.append(g)
        tols.append(tol)
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        m_hat = jax.tree.map(lambda m: m / (1 - b1 ** t), m)
        v_hat = jax.tree.map(lambda v: v / (1 - b2 ** t), v)
        decay = lambda p: weight_decay * (p.ndim >= 2) * p  # noqa: E731  (kernels only)
        rounding = 6 * EPS32 + 4 * EPS32 / (1 - b1 ** t) + 2 * EPS32 / (1 - b2 ** t)
        r = jax.tree.map(lambda m, v: m / (np.sqrt(v) + eps), m_hat, v_hat)
        bound = jax.tree.map(lambda acc, p, r: acc + lr * np.abs(r) * rounding
                             + EPS32 * (np.abs(p) + lr * np.abs(r) + 2 * lr * np.abs(decay(p))), bound, params, r)
        params = jax.tree.map(lambda p, r, mv: p - mv * lr * (r + decay(p)), params, r, moves)

        # r = m_hat / (sqrt(v_hat) + eps); dr/dg_s = a_s / d - m_hat * c_s * g_s / (d^2 sqrt(v_hat)), d = sqrt + eps,
        # a_s, c_s the weights of g_s in m_hat and v_hat: a float32 gradient off by tol_s moves r by at most
        # sum_s |dr/dg_s| tol_s (to first order: each tol_s is below a tenth of its |g_s|, asserted).
        def step_bound(acc, m_hat, v_hat, *g_and_tol):  # (AdamW's decay adds lr * wd * |p error|: lr * wd below eps)
            d, out = np.sqrt(v_hat) + eps, acc
            for s, (g_s, tol_s) in enumerate(zip(g_and_tol[:t], g_and_tol[t:]), start=1):
                assert np.all(tol_s < np.abs(g_s) / 10), "a gradient entry within its tolerance of 0: pick other data"
                a_s = (1 - b1) * b1 ** (t - s) / (1 - b1 ** t)
                c_s = (1 - b2) * b2 ** (t - s) / (1 - b2 ** t)
                out = out + lr * np.abs(a_s / d - m_hat * c_s * g_s / (d ** 2 * np.sqrt(v_hat))) * tol_s
            return out

        bound = jax.tree.map(step_bound, bound, m_hat, v_hat, *gs, *tols)
    return params, bound


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_k_accumulated_adam_steps_follow_float64_adam_on_the_concatenated_batches(weight_decay):
    """jaxcnn's Adam / AdamW, 2 updates of K micro-batches each (with a frozen output bias through
    freeze.masked for AdamW: it stays bitwise), against float64 Adam / AdamW on the concatenated batches'
    float64 gradients. Tolerance: each gradient's float32 tolerance carried through Adam's derivative,
    doubled for the second gradient being taken at float32 weights, plus Adam's own float32 roundings
    (``_adam64``)."""
    from jaxcnn import freeze

    lr, updates = 0.01, 2
    batches = _micro_batches(K * updates, seed=1)
    plain = _mlp_state(adam(lr))
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: freeze.FROZEN if weight_decay and [k.key for k in path] == ["out", "bias"]
        else freeze.TRAINABLE,
        plain.params)
    state = accumulate_gradients(_mlp_state(adam(lr, weight_decay=weight_decay, labels=labels)), K)
    p0 = jax.tree.map(np.array, state.params)
    step = jax.jit(make_train_step(labels=labels), donate_argnums=0)
    for batch in batches:
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert int(state.opt_state.gradient_step) == updates and int(state.step) == K * updates

    done = []

    def grads_fn(params):  # update u: the float64 gradient of its K micro-batches, and the float32 tolerance
        g, norms = _grad64(params, _concat(batches[K * len(done):K * (len(done) + 1)]))
        done.append(None)
        return g, jax.tree.map(lambda g, n: 2 * _grad_tolerance(g, n, ACCUMULATED_SUMS), g, norms)

    moves = jax.tree.map(lambda lab: lab == freeze.TRAINABLE, labels)
    oracle, bound = _adam64(p0, grads_fn, updates, lr, weight_decay=weight_decay, moves=moves)
    for path, p in jax.tree_util.tree_leaves_with_path(p0):
        keys = [k.key for k in path]
        got = np.asarray(state.params[keys[0]][keys[1]], np.float64)
        want, tol = oracle[keys[0]][keys[1]], bound[keys[0]][keys[1]]
        if labels[keys[0]][keys[1]] == freeze.FROZEN:
            assert got.tobytes() == np.asarray(p, np.float64).tobytes()
            continue
        err = np.abs(got - want)
        assert np.all(err <= tol), (keys, float(np.max(err / tol)))
    # the learning rate stays readable inside the MultiSteps state
    assert get_learning_rate(state.opt_state) == pytest.approx(lr)


# --------------------------------------------------------------------------- fit: resume, schedule, records


def _tiny_cnn_state():
    model = CifarCNN(widths=(4,), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))


def _tiny_dataset(n_train=40, n_eval=8):
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    return Dataset(name="synthetic", train=split(n_train), val=split(n_eval), test=split(n_eval), num_classes=3,
                   class_names=("a", "b", "c"))


class _SignalsAt:
    """A train step that sends SIGINT to this process before train step ``at``."""

    def __init__(self, inner, at: int):
        self.inner, self.lower, self.at = inner, inner.lower, at

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(state, batch)


def _cosine(t, total, warm):
    """float64: the rate's factor at optimizer update t (0-based)."""
    return t / warm if t < warm else (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2


def _latest(workdir, which="latest"):
    template = accumulate_gradients(_tiny_cnn_state(), K)
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        tree, _ = c.restore(which, target=state_to_tree(template))
    return tree


def test_a_run_stopped_between_two_updates_resumes_to_the_uninterrupted_run_bitwise(tmp_path):
    """5 steps an epoch, K = 3 (not a multiple: epoch 1's last partial accumulation goes on into epoch 2),
    2 epochs of warm-up + cosine, augmentation, dropout and BatchNorm on: stopped by a signal after train
    step 8 of 10 (2 micro-batches into the third update) and resumed, the run ends in the uninterrupted
    run's state (the accumulated gradients included), history and scores. The run's last batch (step 10,
    the first of a fourth update) makes no update."""
    config = FitConfig(epochs=2, batch_size=8, eval_batch_size=8, warmup_epochs=1, lr_schedule="cosine",
                       grad_accum_steps=K)
    data = _tiny_dataset()
    _, history, summary = fit(_tiny_cnn_state(), data, config, tmp_path / "a", progress=False)
    steps = Steps.build(config, steps_per_epoch=5)
    with pytest.raises(RunInterrupted, match="in epoch 2 at step 3 of 5"):
        fit(_tiny_cnn_state(), data, config, tmp_path / "b", progress=False,
            steps=dataclasses.replace(steps, train=_SignalsAt(steps.train, 7)))
    cut = _latest(tmp_path / "b", "interrupted")
    assert (int(cut["step"]), int(cut["opt_state"].mini_step), int(cut["opt_state"].gradient_step)) == (8, 2, 2)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(cut["opt_state"].acc_grads))
    _, history2, summary2 = fit(_tiny_cnn_state(), data, config, tmp_path / "b", progress=False, resume=True)

    a, b = _latest(tmp_path / "a"), _latest(tmp_path / "b")
    assert (int(a["step"]), int(a["opt_state"].mini_step), int(a["opt_state"].gradient_step)) == (10, 1, 3)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    timing = ("epoch_time_s", "images_per_s")
    strip = lambda h: [{k: v for k, v in r.items() if k not in timing} for r in h]  # noqa: E731
    assert strip(history2) == strip(history)
    assert (summary2["test_loss"], summary2["test_accuracy"]) == (summary["test_loss"], summary["test_accuracy"])
    # the schedule counts updates: 10 // 3 = 3 of them, 5 // 3 = 1 of warm-up; an epoch's last batch (train
    # step 5e - 1) goes into update (5e - 1) // 3: 1, then 3 (past the end: the rate 0)
    assert steps.schedule_steps == (3, 1)
    for r in history:
        want = 1e-3 * _cosine(min((5 * r["epoch"] - 1) // K, 3), 3, 1)
        assert abs(r["lr"] - want) <= 1e-3 * 4 * EPS32 + 5e-7 * want, (r["epoch"], r["lr"], want)
    assert [r["lr"] for r in history] == [1e-3, 0.0]
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["fit"]["grad_accum_steps"] == K and saved["optimizer"]["learning_rate"] == 1e-3


class _Ones(optax.GradientTransformation):
    """An optimizer whose update is 1 for every parameter: the weights' change is the schedule's scale."""

    def __new__(cls):
        return super().__new__(cls, lambda params: optax.EmptyState(),
                               lambda grads, state, params=None: (jax.tree.map(jnp.ones_like, grads), state))


def test_the_train_step_scales_update_u_by_the_cosine_at_u():
    """4 epochs of 3 steps, 1 of warm-up, K = 2: 6 updates (1 of warm-up); with an optimizer whose update is
    1, each train step moves the weights by f(step // 2) at the update's last micro-step (odd steps) and by
    exactly 0 at the others; Steps.lr_scale says the same. f in float32: a few ulps of 1."""
    config = FitConfig(epochs=4, warmup_epochs=1, lr_schedule="cosine", grad_accum_steps=2, augment=None)
    steps = Steps.build(config, steps_per_epoch=3)
    assert steps.schedule_steps == (6, 1)
    state = accumulate_gradients(_mlp_state(_Ones()), 2)
    batch = {k: jnp.asarray(v) for k, v in _micro_batches(1)[0].items()}
    for s in range(12):
        before = np.asarray(state.params["out"]["bias"], np.float64)
        state, _ = steps.train(state, batch)
        moved = np.asarray(state.params["out"]["bias"], np.float64) - before
        want = _cosine(s // 2, 6, 1) if s % 2 else 0.0
        assert np.all(np.abs(moved - want) <= 4 * EPS32 * (1 + np.abs(before))), (s, moved, want)
        assert abs(steps.lr_scale(s) - _cosine(s // 2, 6, 1)) <= 4 * EPS32, s
    assert int(state.opt_state.gradient_step) == 6


# --------------------------------------------------------------------------- refusals, and k = 1


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "2", None])
def test_bad_values_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=rf"^FitConfig: grad_accum_steps={re.escape(repr(bad))}; must be an int >= 1 "
                                         r"\(1: off; k: one optimizer update from the mean gradient of every k "
                                         r"batches\)$"):
        FitConfig(grad_accum_steps=bad)
    with pytest.raises(ValueError, match=rf"^accumulate_gradients: grad_accum_steps={re.escape(repr(bad))}; must be "
                                         r"an int >= 1 \(1: off\)$"):
        accumulate_gradients(_mlp_state(adam(1e-3)), bad)


def test_what_cannot_apply_is_refused_before_anything_is_written(tmp_path):
    data = _tiny_dataset()
    config = FitConfig(epochs=1, batch_size=8, eval_batch_size=8, augment=None, grad_accum_steps=2)
    # the setting lives in the FitConfig only: a state that already accumulates is refused
    with pytest.raises(ValueError, match=r"^accumulate_gradients: the state's optimizer already accumulates gradients "
                                         r"\(an optax.MultiSteps state\); build it without \(jaxcnn.train.adam\) and "
                                         r"set FitConfig.grad_accum_steps$"):
        fit(accumulate_gradients(_tiny_cnn_state(), 2), data, config, tmp_path / "run", progress=False)
    # steps built for another k
    with pytest.raises(ValueError, match=r"fit: the steps apply grad_accum_steps=1 but the FitConfig says "
                                         r"grad_accum_steps=2"):
        fit(_tiny_cnn_state(), data, config, tmp_path / "run", progress=False,
            steps=Steps.build(dataclasses.replace(config, grad_accum_steps=1)))
    # a cosine schedule with no update after its warm-up: 3 epochs of 1 step, 2 of warm-up, K = 2: 1 update
    cosine = FitConfig(epochs=3, warmup_epochs=2, lr_schedule="cosine", grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"^Steps.build: lr_schedule='cosine' with grad_accum_steps=2: 3 epochs of 1 "
                                         r"steps make 1 optimizer updates, 1 of them warm-up \(2 epochs\); need fewer "
                                         r"warm-up updates than updates \(fewer grad_accum_steps, or more epochs\)$"):
        Steps.build(cosine, steps_per_epoch=1)
    # more train steps to an update than the run has: no update at all (reduce-on-plateau; the cosine's is above)
    n = len(data.train) // 8
    with pytest.raises(ValueError, match=rf"^fit: grad_accum_steps={n + 1} with 1 epochs of {n} steps: {n} train "
                                         rf"steps make no optimizer update, so the weights would never change; use "
                                         rf"grad_accum_steps <= {n} \(or more epochs, or a smaller batch_size\)$"):
        fit(_tiny_cnn_state(), data, dataclasses.replace(config, grad_accum_steps=n + 1), tmp_path / "run",
            progress=False)
    assert not (tmp_path / "run").exists()
    # a resume with another k is refused naming it
    fit(_tiny_cnn_state(), data, config, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"fit.grad_accum_steps \(2 -> 3\)"):
        fit(_tiny_cnn_state(), data, dataclasses.replace(config, epochs=2, grad_accum_steps=3), tmp_path / "run",
            progress=False, resume=True)


def test_k_1_leaves_the_state_and_the_checkpoint_as_without_it(tmp_path):
    state = _tiny_cnn_state()
    assert accumulate_gradients(state, 1) is state
    plain = _tiny_cnn_state()
    config = FitConfig(epochs=1, batch_size=8, eval_batch_size=8, augment=None)
    assert config.grad_accum_steps == 1
    final, _, _ = fit(state, _tiny_dataset(), config, tmp_path, progress=False)
    assert jax.tree.structure(final.opt_state) == jax.tree.structure(plain.opt_state)
    assert not any(isinstance(s, optax.MultiStepsState)
                   for s in jax.tree.leaves(final.opt_state, is_leaf=lambda x: isinstance(x, optax.MultiStepsState)))
    with RunFolder(tmp_path).checkpoints(read_only=True) as c:
        tree, _ = c.restore("latest", target=state_to_tree(plain))
    assert jax.tree.structure(tree) == jax.tree.structure(state_to_tree(plain))
    assert json.loads((tmp_path / "config.json").read_text())["fit"]["grad_accum_steps"] == 1
