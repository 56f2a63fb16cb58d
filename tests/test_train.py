"""Train and eval steps: NumPy-checked loss and Adam update, keys from (seed, step), masked eval, frozen params."""

import re
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.data import Split
from float64_oracle import assert_close_to_float64, float32_sum_tolerance
from jaxcnn.train import (EvalFeed, TrainState, adam, evaluate, get_learning_rate, make_eval_step, make_mesh,
                          make_train_step, set_learning_rate, step_keys, Steps)


class Linear(nn.Module):
    """Flatten + Dense: no BN, no dropout; the step's arithmetic can be written out in NumPy."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        return nn.Dense(3, name="out")(x.reshape((x.shape[0], -1)))


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_train_step_matches_numpy_loss_gradient_and_adam():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 2, 2, 1), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2], np.int32)
    model = Linear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(0.01), key=jax.random.key(1))
    w = np.asarray(variables["params"]["out"]["kernel"], np.float64)  # (4, 3)
    b = np.asarray(variables["params"]["out"]["bias"], np.float64)

    step = jax.jit(make_train_step(), donate_argnums=0)
    new, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})

    x = images.reshape(4, -1).astype(np.float64) / 255.0
    p = _np_softmax(x @ w + b)
    loss = -np.mean(np.log(p[np.arange(4), labels]))
    onehot = np.eye(3)[labels]
    gw, gb = x.T @ (p - onehot) / 4, (p - onehot).mean(0)
    # Adam, first step: m̂ = g, v̂ = g², update = -lr · g / (|g| + eps).
    adam_step = lambda g: -0.01 * g / (np.abs(g) + 1e-8)  # noqa: E731
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-6)
    assert float(metrics["accuracy"]) == np.mean(p.argmax(-1) == labels)
    np.testing.assert_allclose(np.asarray(new.params["out"]["kernel"]), w + adam_step(gw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.params["out"]["bias"]), b + adam_step(gb), rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1 and new.batch_stats == {}


def _tiny_cnn_state(seed=0, lr=1e-3, labels=None):
    model = CifarCNN(widths=(4, 8), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)), train=False)
    return model, TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(lr, labels=labels),
                                    key=jax.random.key(seed + 100))


def _batch(n=8, seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, 3, n).astype(np.int32))}


# The tiny CNN's float32 forward pass as a chain of sums (float64_oracle): per block, two 3x3
# convolutions (3*3*C_in terms) each followed by BatchNorm's batch statistics (N*H*W terms, batch 8,
# 8x8 then 4x4 pixels); the dense layer (2*2*8), its BatchNorm (8), the logits (8), the softmax (3)
# and the mean over the batch (8).
TINY_CNN_SUMS = (27, 512, 36, 512, 36, 128, 72, 128, 32, 8, 8, 3, 8)


def _float64_dropout_masks(monkeypatch):
    """With x64 on, ``jax.random.bernoulli(key, 0.75)`` draws float64 uniforms: other masks than the
    float32 step's. Drawing them from a float32 ``p`` keeps the very masks of the float32 step."""
    from jaxcnn import layers

    monkeypatch.setattr(layers, "bernoulli", lambda key, p, shape: jax.random.bernoulli(
        key, jnp.float32(p), (int(np.prod(shape)),)).reshape(shape))


def test_train_step_uses_fold_in_seed_step_keys_and_updates_batch_stats(monkeypatch):
    """Loss of step s == the model applied with dropout key split(fold_in(key, s))[0]: the float32
    step against the same model in float64 with that key (float64 oracle, the same dropout masks);
    another key's masks move the loss by far more than the tolerance."""
    model, state = _tiny_cnn_state()
    batch = _batch()
    labels = np.asarray(batch["label"])
    step = jax.jit(make_train_step())
    _float64_dropout_masks(monkeypatch)

    @jax.jit
    def forward64(variables, x, key):  # -> (logits, updated batch_stats), in float64 (under x64)
        logits, upd = model.clone(dtype=jnp.float64).apply(variables, x, train=True, rngs={"dropout": key},
                                                           mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    def oracle(key):  # (loss, batch_stats) in float64; the logits leave the model as float32 (1e-7 of them)
        with jax.enable_x64(True):
            variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     {"params": state.params, "batch_stats": state.batch_stats})
            logits, stats = forward64(variables, jnp.asarray(batch["image"], jnp.float64) / 255.0, key)
            z = np.asarray(logits, np.float64)
            z = z - z.max(-1, keepdims=True)
            return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), labels]), jax.tree.map(np.asarray, stats)

    for s in range(3):
        dropout_key, other_key = step_keys(state.key, jnp.asarray(s))
        loss, stats = oracle(dropout_key)
        other_loss, _ = oracle(other_key)
        state, metrics = step(state, batch)
        assert_close_to_float64(float(metrics["loss"]), loss, TINY_CNN_SUMS, what=f"step {s}'s loss")
        assert abs(other_loss - loss) > 100 * float32_sum_tolerance(TINY_CNN_SUMS, loss)  # the key counts
        jax.tree.map(lambda a, e: assert_close_to_float64(a, e, TINY_CNN_SUMS, np.abs(e).max(), what="batch_stats"),
                     state.batch_stats, stats)
    assert int(state.step) == 3


def test_augment_fn_gets_the_step_augment_key():
    seen = []
    _, state = _tiny_cnn_state()

    def augment(key, images):  # records the key; flips the images so the result depends on it
        seen.append(key)
        return images[:, :, ::-1]

    make_train_step(augment_fn=augment)(state, _batch())
    _, expected = step_keys(state.key, state.step)
    np.testing.assert_array_equal(jax.random.key_data(seen[0]), jax.random.key_data(expected))


def test_eval_counts_every_example_once_with_a_non_dividing_batch():
    model, state = _tiny_cnn_state()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 10).astype(np.int32)
    mesh = make_mesh()
    got = evaluate(state, EvalFeed(Split(images, labels), 4, mesh), jax.jit(make_eval_step()))  # 4 + 4 + 2
    with jax.enable_x64(True):  # the float64 oracle: the model in float64 (its logits leave it as float32)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.variables)
        logits = np.asarray(model.clone(dtype=jnp.float64).apply(variables, jnp.asarray(images, jnp.float64) / 255.0,
                                                                 train=False), np.float64)
    p = _np_softmax(logits)
    assert got["count"] == 10
    # one example left out or counted twice moves the mean by ~1/10 of an example's loss
    assert_close_to_float64(got["loss"], -np.mean(np.log(p[np.arange(10), labels])), TINY_CNN_SUMS, what="loss")
    assert got["accuracy"] == pytest.approx(np.mean(p.argmax(-1) == labels))


def test_learning_rate_lives_in_the_state_and_can_be_set():
    _, state = _tiny_cnn_state(lr=1e-3)
    assert get_learning_rate(state.opt_state) == pytest.approx(1e-3)
    halved = set_learning_rate(state, 5e-4)
    assert get_learning_rate(halved.opt_state) == pytest.approx(5e-4)
    batch = _batch()
    a, _ = make_train_step()(state, batch)
    b, _ = make_train_step()(halved, batch)
    # Adam's first step is ±lr per weight (where the gradient is not tiny): half the move.
    da = np.asarray(a.params["logits"]["bias"] - state.params["logits"]["bias"])
    db = np.asarray(b.params["logits"]["bias"] - state.params["logits"]["bias"])
    np.testing.assert_allclose(db, da / 2, rtol=1e-4)


def _float64_first_adam_step(model, state, batch, lr):
    """The float64 oracle of a first training step from ``state`` (call with ``_float64_dropout_masks``
    on): ``(loss, params, trusted)``. Adam's first step moves each weight by ``-lr * g / (|g| + 1e-8)``;
    where float32's gradient cannot pin down the sign of ``g`` (``|g|`` within the tolerance of the
    gradient, ``trusted`` False) the float32 step may move it anywhere in ``[-lr, lr]``."""
    dropout_key, _ = step_keys(state.key, jnp.asarray(0))
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        x = jnp.asarray(batch["image"], jnp.float64) / 255.0
        labels = jnp.asarray(batch["label"])

        def loss_fn(params):
            logits, _ = model.clone(dtype=jnp.float64).apply(
                {"params": params, "batch_stats": to64(state.batch_stats)}, x, train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float64), labels).mean()

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(to64(state.params))
        loss, grads, params = float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, to64(state.params))
    # forward and backward: the network's chain of sums twice
    g_tol = jax.tree.map(lambda g: float32_sum_tolerance(2 * TINY_CNN_SUMS, np.abs(g).max()), grads)
    new = jax.tree.map(lambda p, g: p - lr * g / (np.abs(g) + 1e-8), params, grads)
    trusted = jax.tree.map(lambda g, t: np.abs(g) > 2 * t, grads, g_tol)
    return loss, new, trusted


def test_frozen_labels_differentiate_only_the_trainable_part(monkeypatch):
    from jaxcnn import freeze

    _, plain = _tiny_cnn_state()
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: freeze.FROZEN if path[0].key.startswith("block1") else freeze.TRAINABLE, plain.params)
    _, state = _tiny_cnn_state(labels=labels)
    batch = _batch()
    split_step = jax.jit(make_train_step(labels=labels))
    full_step = jax.jit(make_train_step())  # full gradient, the optimizer's mask zeroes the frozen updates
    a, ma = split_step(state, batch)
    b, mb = full_step(state, batch)
    # each step against the float64 first step (the same dropout masks), not against the other
    _float64_dropout_masks(monkeypatch)
    loss64, params64, trusted = _float64_first_adam_step(CifarCNN(widths=(4, 8), dense_units=8, num_classes=3),
                                                         state, batch, lr=1e-3)
    for m in (ma, mb):
        assert_close_to_float64(float(m["loss"]), np.float64(loss64), TINY_CNN_SUMS, what="loss")
    for name in state.params:
        for leaf in state.params[name]:
            if name.startswith("block1"):  # frozen: bitwise unchanged
                np.testing.assert_array_equal(a.params[name][leaf], state.params[name][leaf])
            else:
                ok = trusted[name][leaf]
                assert ok.mean() > 0.9, (name, leaf)  # nearly every gradient is far from 0
                for got in (a, b):  # the weight and its move of about lr: a few roundings
                    assert_close_to_float64(np.asarray(got.params[name][leaf])[ok], params64[name][leaf][ok], 2,
                                            np.abs(np.asarray(state.params[name][leaf], np.float64)[ok]) + 1e-3,
                                            what=f"{name}/{leaf}")
                assert not np.array_equal(np.asarray(a.params[name][leaf]), np.asarray(state.params[name][leaf]))
    # The split step takes no gradient through the frozen block: fewer convolutions in its program.
    n_conv = lambda f: len(re.findall(r"conv_general_dilated|jaxcnn_onednn_conv",  # noqa: E731  either path
                                      str(jax.make_jaxpr(f)(state, batch))))
    assert n_conv(make_train_step(labels=labels)) < n_conv(make_train_step())


def test_fit_with_frozen_labels_keeps_frozen_params_through_checkpoints(tmp_path):
    """The fine-tuning path end to end: fit with a label tree, the checkpoint (optax MaskedNode state) restores."""
    from jaxcnn import freeze
    from jaxcnn.data import Dataset
    from jaxcnn.runfolder import RunFolder
    from jaxcnn.train import FitConfig, fit, state_from_tree, state_to_tree

    _, plain = _tiny_cnn_state()
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: freeze.FROZEN if path[0].key.startswith("block1") else freeze.TRAINABLE, plain.params)
    _, state = _tiny_cnn_state(labels=labels)
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),  # noqa: E731
                            rng.integers(0, 3, n).astype(np.int32))
    ds = Dataset(name="synthetic", train=split(32), val=split(8), test=split(8), num_classes=3,
                 class_names=("a", "b", "c"))
    config = FitConfig(epochs=1, batch_size=16, eval_batch_size=8, augment=None)
    initial = jax.tree.map(np.array, state.params)  # fit consumes (donates) the state it is given
    final, _, _ = fit(state, ds, config, tmp_path, steps=Steps.build(config, labels), progress=False)
    with RunFolder(tmp_path).checkpoints(read_only=True) as c:
        tree, _ = c.restore("latest", target=state_to_tree(final))
    saved = state_from_tree(final, tree)
    for name in initial:
        for leaf in initial[name]:
            same = np.array_equal(np.asarray(saved.params[name][leaf]), initial[name][leaf])
            assert same == name.startswith("block1"), (name, leaf)
            np.testing.assert_array_equal(saved.params[name][leaf], final.params[name][leaf])
    assert int(saved.step) == 2


def test_fit_refuses_steps_that_apply_other_settings_than_its_config(tmp_path):
    """config.json records what ran: steps built for augmentation cannot run under a config without it
    (the old ``train_step=`` argument recorded ``config.augment`` and applied the step's own)."""
    from jaxcnn.data import AugmentConfig, Dataset
    from jaxcnn.train import FitConfig, fit

    _, state = _tiny_cnn_state()
    ds = Dataset(name="synthetic", train=Split(np.zeros((16, 8, 8, 3), np.uint8), np.zeros(16, np.int32)),
                 val=Split(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int32)),
                 test=Split(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int32)), num_classes=3,
                 class_names=("a", "b", "c"))
    config = FitConfig(epochs=1, batch_size=16, eval_batch_size=8, augment=None)
    steps = Steps.build(FitConfig(augment=AugmentConfig()))
    with pytest.raises(ValueError, match=r"fit: the steps apply augment=AugmentConfig\(.*\) but the FitConfig says "
                                         r"augment=None"):
        fit(state, ds, config, tmp_path / "run", steps=steps, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
