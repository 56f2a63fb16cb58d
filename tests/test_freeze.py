"""Freezing: label trees mean what Keras' `trainable = False` means (counts, BN mode), frozen
arrays stay bitwise unchanged through training, and the optimizer keeps nothing for them.

The tests against Keras ask for the ``keras`` fixture (tests/conftest.py): without Keras they
are skipped one by one, and the others still run."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from float64_oracle import assert_close_to_float64, fan_ins, two_float32_networks_tolerance
from jaxcnn import freeze
from jaxcnn.models.resnet import KERAS_LAYER_ORDER, Classifier, ResNet50, ResNetTiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")

TINY_ORDER = ResNetTiny(include_top=False).layer_order()


def tiny_classifier():
    return Classifier(ResNetTiny(include_top=False, pooling="avg"), num_classes=3)


@pytest.fixture(scope="module")
def tiny_vars():
    x = jnp.zeros((1, 32, 32, 3))
    return jax.jit(lambda k: tiny_classifier().init(k, x, train=False))(jax.random.key(0))


@pytest.fixture(scope="module")
def resnet50_abstract():
    """Shapes of ResNet50(include_top=False) variables (no compute)."""
    x = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(lambda: ResNet50(include_top=False).init(jax.random.key(0), x, train=False))


# --------------------------------------------------------------------------- splits


def test_partition_combine_roundtrip_is_exact_and_jittable(tiny_vars):
    params = tiny_vars["params"]
    labels = freeze.label_tree(params, freeze.first_n_keras_layers(20, TINY_ORDER))
    trainable, frozen = freeze.partition(params, labels)
    back = freeze.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    # No leaf in both halves; together they hold every leaf.
    n_t, n_f = len(jax.tree.leaves(trainable)), len(jax.tree.leaves(frozen))
    assert n_t > 0 and n_f > 0 and n_t + n_f == len(jax.tree.leaves(params))
    assert trainable["backbone"]["conv1_conv"]["kernel"] is None
    assert frozen["head"]["kernel"] is None
    jitted = jax.jit(freeze.combine)(trainable, frozen)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_gradient_wrt_trainable_equals_full_gradient_restricted(tiny_vars):
    model, v = tiny_classifier(), tiny_vars
    labels = freeze.label_tree(v["params"], freeze.by_prefix("conv1", "conv2"))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) * 50

    def loss(p):
        return jnp.sum(model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=False) ** 2)

    full = jax.jit(jax.grad(loss))(v["params"])
    trainable, frozen = freeze.partition(v["params"], labels)
    part = jax.jit(jax.grad(lambda t: loss(freeze.combine(t, frozen))))(trainable)
    want, _ = freeze.partition(full, labels)
    assert jax.tree.structure(part) == jax.tree.structure(want)
    # each against the float64 gradient (the same network in float64): same math, other op order
    model64 = Classifier(ResNetTiny(include_top=False, pooling="avg", dtype=jnp.float64), num_classes=3)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        grad64 = jax.jit(jax.grad(lambda p: jnp.sum(model64.apply({"params": p, "batch_stats": to64(v["batch_stats"])},
                                                                  jnp.asarray(x, jnp.float64), train=False) ** 2)))
        oracle, _ = freeze.partition(jax.tree.map(np.asarray, grad64(to64(v["params"]))), labels)
    # forward and backward through the network: its chain of sums twice, and the batch of 2
    sums = 2 * fan_ins(v["params"]) + (2,)
    for got in (part, want):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(oracle)):
            assert b.dtype == np.float64
            assert_close_to_float64(a, b, sums, np.abs(b).max(), what="gradient")


def test_rules_and_bad_input(resnet50_abstract):
    params = resnet50_abstract["params"]
    labels = freeze.label_tree(params, freeze.first_n_keras_layers(100, KERAS_LAYER_ORDER))
    # layers[:100] ends at conv4_block2_3_conv (index 99): its BN (index 100) stays trainable.
    assert KERAS_LAYER_ORDER[99:101] == ("conv4_block2_3_conv", "conv4_block2_3_bn")
    assert labels["conv4_block2_3_conv"]["kernel"] == "frozen"
    assert labels["conv4_block2_3_bn"]["scale"] == "trainable"
    assert labels["conv4_block2_2_bn"]["bias"] == "frozen"
    assert "conv4_block2_3_conv" in freeze.frozen_layer_names(labels)
    assert "conv4_block2_3_bn" not in freeze.frozen_layer_names(labels)
    bn = freeze.label_tree(params, freeze.by_pattern(r"_bn$"))
    assert freeze.frozen_layer_names(bn) == {n for n in params if n.endswith("_bn")}
    both = freeze.label_tree(params, freeze.by_prefix("conv1") | freeze.by_pattern(r"^conv5_block3"))
    assert freeze.frozen_layer_names(both) == {"conv1_conv", "conv1_bn"} | {n for n in params if n.startswith("conv5_block3")}
    assert freeze.frozen_layer_names(freeze.label_tree(params, freeze.nothing())) == frozenset()
    with pytest.raises(ValueError, match=r"by_prefix\('conv9',\) freezes no layer"):
        freeze.label_tree(params, freeze.by_prefix("conv9"))
    with pytest.raises(ValueError, match="backbone.*freezes no layer"):
        freeze.label_tree(params, freeze.backbone())  # a bare ResNet50 has no "backbone" submodule
    with pytest.raises(ValueError, match="n=200 but layer_order has only 177"):
        freeze.first_n_keras_layers(200, KERAS_LAYER_ORDER)
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        freeze.first_n_keras_layers(-1, KERAS_LAYER_ORDER)
    with pytest.raises(TypeError, match="layer_order must be a sequence of layer names"):
        freeze.first_n_keras_layers(3, "conv1_conv")
    with pytest.raises(ValueError, match=r"first_n_keras_layers\(2\) freezes no layer"):  # an order not of params
        freeze.label_tree(params, freeze.first_n_keras_layers(2, ("block1_conv1", "block1_bn1")))
    with pytest.raises(ValueError, match="invalid regex"):
        freeze.by_pattern("(")
    with pytest.raises(ValueError, match="leaves must be 'trainable' or 'frozen'"):
        freeze.partition({"a": jnp.ones(2)}, {"a": "Frozen"})


# --------------------------------------------------------------------------- counts vs Keras


@pytest.fixture(scope="module")
def keras_notop(keras):
    return keras.applications.ResNet50(weights=None, include_top=False)


def keras_counts(model, is_frozen):
    """Set trainable per layer as a Keras user would; return Keras' (trainable, non-trainable)."""
    for i, layer in enumerate(model.layers):
        layer.trainable = not is_frozen(i, layer.name)
    count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)  # noqa: E731
    result = count(model.trainable_weights), count(model.non_trainable_weights)
    for layer in model.layers:
        layer.trainable = True
    return result


def summary_counts(text):
    grab = lambda what: int(re.search(rf"^{what} params: ([\d,]+)", text, re.M).group(1).replace(",", ""))  # noqa: E731
    return grab("Trainable"), grab("Non-trainable"), grab("Total")


@pytest.mark.parametrize(
    "rule, keras_rule",
    [
        (freeze.first_n_keras_layers(100, KERAS_LAYER_ORDER), lambda i, name: i < 100),
        (freeze.first_n_keras_layers(175, KERAS_LAYER_ORDER), lambda i, name: i < 175),
        (freeze.by_prefix("conv1", "conv2"), lambda i, name: name.startswith(("conv1", "conv2"))),
        (freeze.by_pattern(r"_bn$"), lambda i, name: re.search(r"_bn$", name) is not None),
        (freeze.nothing(), lambda i, name: False),
    ],
    ids=["first100", "first175", "prefix", "pattern_bn", "nothing"],
)
def test_counts_match_keras(resnet50_abstract, keras_notop, rule, keras_rule):
    v = resnet50_abstract
    labels = freeze.label_tree(v["params"], rule)
    want = keras_counts(keras_notop, keras_rule)
    assert freeze.count_params(v["params"], v["batch_stats"], labels) == want
    text = freeze.summary(v["params"], v["batch_stats"], labels, layer_order=KERAS_LAYER_ORDER)
    assert summary_counts(text) == (*want, sum(want))


def test_counts_match_keras_whole_backbone_frozen(keras_notop, keras):
    # Keras: base_model.trainable = False, then GlobalAveragePooling2D + Dense(3).
    x = keras.layers.GlobalAveragePooling2D()(keras_notop.output)
    full = keras.Model(keras_notop.input, keras.layers.Dense(3)(x))
    keras_notop.trainable = False
    try:
        count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)  # noqa: E731
        want = count(full.trainable_weights), count(full.non_trainable_weights)
    finally:
        keras_notop.trainable = True
    model = Classifier(ResNet50(include_top=False, pooling="avg"), num_classes=3)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    labels = freeze.label_tree(v["params"], freeze.backbone())
    assert freeze.count_params(v["params"], v["batch_stats"], labels) == want == (2048 * 3 + 3, 23587712)
    assert summary_counts(freeze.summary(v["params"], v["batch_stats"], labels))[:2] == want


# --------------------------------------------------------------------------- training


def train(model, variables, labels, steps, key):
    """A plain jitted optax loop: grads w.r.t. the trainable part only, masked Adam."""
    tx = freeze.masked(optax.adam(1e-2), labels)
    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt_state, x, y):
        trainable, frozen = freeze.partition(params, labels)

        def loss_fn(t):
            logits, upd = model.apply(
                {"params": freeze.combine(t, frozen), "batch_stats": stats},
                x, train=True, frozen_bn=frozen_bn, mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(freeze.fill_frozen(g, frozen), opt_state, params)
        return freeze.apply_trainable_updates(params, updates, labels), stats, opt_state

    params, stats = variables["params"], variables["batch_stats"]
    for i in range(steps):
        kx, ky = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(kx, (4, 32, 32, 3)) * 60.0
        y = jax.random.randint(ky, (4,), 0, 3)
        params, stats, opt_state = step(params, stats, opt_state, x, y)
    return params, stats, opt_state


def same_bits(a, b):
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("rule", [freeze.first_n_keras_layers(20, TINY_ORDER), freeze.backbone()],
                         ids=["first20", "backbone"])
def test_training_leaves_frozen_bitwise_and_moves_the_rest(tiny_vars, rule):
    model = tiny_classifier()
    labels = freeze.label_tree(tiny_vars["params"], rule)
    params, stats, opt_state = train(model, tiny_vars, labels, steps=3, key=jax.random.key(5))

    flat_labels = dict(jax.tree_util.tree_leaves_with_path(labels))
    old_p = dict(jax.tree_util.tree_leaves_with_path(tiny_vars["params"]))
    for path, new in jax.tree_util.tree_leaves_with_path(params):
        if flat_labels[path] == "frozen":
            assert same_bits(new, old_p[path]), jax.tree_util.keystr(path)
        else:
            assert not np.array_equal(new, old_p[path]), jax.tree_util.keystr(path)

    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
    assert any(n.endswith("_bn") for n in frozen_bn)
    old_s = tiny_vars["batch_stats"]["backbone"]
    for layer, st in stats["backbone"].items():
        for k in ("mean", "var"):
            if layer in frozen_bn:
                assert same_bits(st[k], old_s[layer][k]), (layer, k)
            else:
                assert not np.array_equal(st[k], old_s[layer][k]), (layer, k)

    # Adam's moments exist for trainable leaves only; frozen ones hold optax.MaskedNode().
    adam = opt_state.inner_states["trainable"].inner_state[0]
    n_trainable, _ = freeze.count_params(params, {}, labels)
    assert sum(a.size for a in jax.tree.leaves(adam.mu)) == n_trainable
    assert sum(a.size for a in jax.tree.leaves(adam.nu)) == n_trainable
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    mu = dict(jax.tree_util.tree_leaves_with_path(adam.mu, is_leaf=is_masked))
    for path, lab in flat_labels.items():
        assert is_masked(mu[path]) == (lab == "frozen"), jax.tree_util.keystr(path)
    assert jax.tree.leaves(opt_state.inner_states["frozen"]) == []


# --------------------------------------------------------------------------- BN mode vs Keras


def keras_tiny(seed):
    from keras.src.applications import resnet as keras_resnet

    def stack_fn(x):
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, stride1=1, name="conv2")
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, name="conv3")
        x = keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv4")
        return keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv5")

    model = keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False, weights=None,
                                input_shape=(32, 32, 3), name="tiny")
    rng = np.random.default_rng(seed)
    for w in model.weights:
        v = rng.uniform(0.5, 1.5, w.shape) if w.path.endswith(("gamma", "variance")) else rng.normal(0, 0.3, w.shape)
        w.assign(v.astype(np.float32))
    return model


def test_frozen_bn_runs_in_inference_mode_like_keras(tmp_path, keras):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from jaxcnn.weights.keras_h5 import load_keras_h5

    kmodel = keras_tiny(seed=3)
    with h5py.File(tmp_path / "tiny.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kmodel)
    flax_model = ResNetTiny(include_top=False)
    variables = load_keras_h5(tmp_path / "tiny.h5", include_top=False, model=flax_model)
    n = 20  # layers[:20] ends at conv3_block1_1_conv: its BN and everything after it train
    assert TINY_ORDER[n - 1] == "conv3_block1_1_conv"
    labels = freeze.label_tree(variables["params"], freeze.first_n_keras_layers(n, TINY_ORDER))
    for layer in kmodel.layers[:n]:
        layer.trainable = False
    x = np.random.default_rng(4).normal(0, 50, (4, 32, 32, 3)).astype(np.float32)
    want = np.asarray(kmodel(x, training=True))  # frozen BN: moving stats; the others: batch stats
    got, _ = flax_model.apply(variables, jnp.asarray(x), train=True,
                              frozen_bn=freeze.frozen_layer_names(labels), mutable=["batch_stats"])
    # Keras in float32 is the reference: both roundings, from eps32 and the network's sums (any CPU),
    # in training mode also the batch statistics of the BN layers that train (N*H*W <= 4*16*16 terms)
    sums = fan_ins(variables["params"]) + (4 * 16 * 16,) * len(variables["batch_stats"])
    tol = two_float32_networks_tolerance(sums, np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol)
    # And it is not the all-inference or the all-training function.
    all_train, _ = flax_model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(all_train) - want).max() > 1e-2 * np.abs(want).max()
