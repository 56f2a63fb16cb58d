"""CifarCNN against the seed's Keras model: parameter counts, and the same outputs with the same weights.

The tests against Keras ask for the ``keras`` fixture (tests/conftest.py), directly or through
``keras_model``: without Keras they are skipped one by one, and the others still run."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported anywhere

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import fan_ins, two_float32_networks_tolerance
from jaxcnn.models.cifar_cnn import CifarCNN, count_params
from jaxcnn.reference import seed_keras_cifar_cnn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


@pytest.fixture(scope="module")
def keras_model(keras):
    return seed_keras_cifar_cnn()


@pytest.fixture(scope="module")
def flax_variables():
    return CifarCNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def _keras_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, non_trainable


def test_parameter_counts_equal_keras(keras_model, flax_variables):
    assert count_params(flax_variables) == _keras_counts(keras_model)
    assert count_params(flax_variables) == (551_722, 1_152)  # hand count: convs 287,008, dense 263,562, BN 1,152
    assert keras_model.count_params() == 552_874  # "Total params" of the seed's model.summary()


def _flax_layer_order():
    names = []
    for b in (1, 2, 3):
        names += [f"block{b}_conv1", f"block{b}_bn1", f"block{b}_conv2", f"block{b}_bn2"]
    return names + ["dense", "dense_bn", "logits"]


def _randomize(model, seed):
    """Random values for every Keras weight: conv / dense kernels and biases, BN gamma and beta
    (no zero biases: a model that ignored a bias must not pass). BN statistics: see _calibrate_bn."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape, name = tuple(w.shape), w.path.rsplit("/", 1)[-1]
        if name == "kernel":
            v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name in ("bias", "beta"):
            v = rng.normal(0.0, 0.2, shape)
        elif name == "gamma":
            v = rng.uniform(0.5, 1.5, shape)
        elif name in ("moving_mean", "moving_variance"):
            continue
        else:
            raise AssertionError(f"unexpected Keras weight {w.path}")
        w.assign(v.astype(np.float32))


def _calibrate_bn(model, x, seed):
    """BN moving statistics on the scale of the real activations, layer by layer in inference mode:
    each BN layer's per-channel input mean / variance on ``x`` (the layers before it already set),
    perturbed: moving_mean = mean + N(0, 0.3)·std, moving_variance = var · U(0.5, 2).

    So every BN layer normalises to O(1), the logits are O(1) (the softmax is not saturated), and
    every bias, mean and variance and the epsilon move the outputs by far more than 1e-4: ignoring
    the conv biases or a dense bias, or epsilon 1e-5 instead of Keras' 1e-3, fails this test."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            a = np.asarray(keras.Model(model.inputs[0], layer.input)(x, training=False), np.float64)
            a = a.reshape(-1, a.shape[-1])  # (N·H·W, C)
            mean, var = a.mean(axis=0), a.var(axis=0)
            assert np.mean(var > 0) > 0.9, layer.name  # BN follows a ReLU: a few units may be dead on x
            var = np.where(var > 0, var, np.median(var))
            layer.moving_mean.assign((mean + rng.normal(0.0, 0.3, mean.shape) * np.sqrt(var)).astype(np.float32))
            layer.moving_variance.assign((var * rng.uniform(0.5, 2.0, var.shape)).astype(np.float32))


def _images(rng, n):
    """Float images in [0, 1]: per-image colour and contrast, pixel noise (so that images differ)."""
    colour, contrast = rng.uniform(0, 1, (n, 1, 1, 3)), rng.uniform(0, 1, (n, 1, 1, 1))
    return np.clip(colour + contrast * (rng.uniform(0, 1, (n, 32, 32, 3)) - 0.5), 0, 1).astype(np.float32)


def _flax_variables_from_keras(model):
    """Keras' weight list (layer order; kernel, bias / gamma, beta, moving_mean, moving_variance)
    as CifarCNN variables."""
    weights = iter(model.get_weights())
    params, stats = {}, {}
    for name in _flax_layer_order():
        if "bn" in name:
            params[name] = {"scale": next(weights), "bias": next(weights)}
            stats[name] = {"mean": next(weights), "var": next(weights)}
        else:
            params[name] = {"kernel": next(weights), "bias": next(weights)}
    assert next(weights, None) is None
    return {"params": params, "batch_stats": stats}


def test_same_weights_same_outputs_as_keras(keras_model, flax_variables):
    """Every weight, bias and BN statistic random (statistics measured, see _calibrate_bn), copied
    from Keras to Flax: the same logits as the seed's model without its softmax (1e-4 of their
    scale), and softmax(logits) == the seed's model's own inference output."""
    rng = np.random.default_rng(0)
    _randomize(keras_model, seed=1)
    _calibrate_bn(keras_model, _images(rng, 64), seed=2)
    variables = _flax_variables_from_keras(keras_model)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, flax_variables)  # same tree, same shapes
    logits_model = seed_keras_cifar_cnn(classifier_activation=None)
    logits_model.set_weights(keras_model.get_weights())

    x = _images(rng, 4)
    logits = np.asarray(CifarCNN().apply(variables, jnp.asarray(x), train=False), np.float64)
    want = np.asarray(logits_model(x, training=False), np.float64)
    scale = np.abs(want).max()
    assert 0.5 < scale < 100, scale  # O(1) logits: not saturating the softmax, nothing vanishes
    # Keras in float32 is the reference: both roundings, from eps32 and the network's sums (any CPU)
    tol = two_float32_networks_tolerance(fan_ins(variables["params"]), scale)
    np.testing.assert_allclose(logits, want, rtol=0, atol=tol)
    probs = np.asarray(keras_model(x, training=False))
    assert probs.max() < 0.99  # not saturated, so the probabilities still compare something
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), probs, rtol=1e-4, atol=1e-6)


def test_param_names_and_shapes(flax_variables):
    p = flax_variables["params"]
    assert sorted(p) == sorted(_flax_layer_order())
    assert p["block1_conv1"]["kernel"].shape == (3, 3, 3, 32)  # HWIO, what the filter plots read
    assert p["dense"]["kernel"].shape == (4 * 4 * 128, 128)
    assert p["logits"]["kernel"].shape == (128, 10)


@pytest.mark.parametrize("conv_dropout", ["dropout", "spatial", "dropblock"])
def test_dropout_variants_use_the_dropout_key(conv_dropout):
    model = CifarCNN(widths=(4, 8), dense_units=8, conv_dropout=conv_dropout, conv_dropout_rate=0.5,
                     dense_dropout=0.0)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    v = model.init(jax.random.key(0), x, train=False)

    def run(k):
        out, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(k)}, mutable=["batch_stats"])
        return np.asarray(out)

    assert not np.allclose(run(1), run(2))
    np.testing.assert_array_equal(run(3), run(3))


def test_without_dropout_training_is_deterministic_and_inference_ignores_rates():
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    plain = CifarCNN(widths=(4, 8), dense_units=8, conv_dropout="none", dense_dropout=0.0)
    v = plain.init(jax.random.key(0), x, train=False)
    a, _ = plain.apply(v, x, train=True, mutable=["batch_stats"])  # no rng needed at all
    b, _ = plain.apply(v, x, train=True, rngs={"dropout": jax.random.key(5)}, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    heavy = CifarCNN(widths=(4, 8), dense_units=8, conv_dropout="spatial", conv_dropout_rate=0.9, dense_dropout=0.9)
    np.testing.assert_array_equal(np.asarray(plain.apply(v, x, train=False)), np.asarray(heavy.apply(v, x, train=False)))


def test_bad_settings_raise_naming_the_argument():
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="conv_dropout='gaussian'"):
        CifarCNN(conv_dropout="gaussian").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="dense_dropout=1.5"):
        CifarCNN(dense_dropout=1.5).init(jax.random.key(0), x, train=False)
    with pytest.raises(TypeError, match="uint8"):
        CifarCNN().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.uint8), train=False)
