"""The Flax ResNet50 computes the same function as keras.applications.ResNet50.

Keras (JAX backend) builds the reference with weights=None; every weight gets a random
value, and every BN moving mean / variance is set from what that layer really sees (the
per-channel mean and variance of its input on a batch of caffe-preprocessed images, then
perturbed); Keras' own legacy HDF5 writer saves them; our converter reads the file; both
models run on other random images. float32, at the tolerance of two float32 roundings of the
network (``float64_oracle.two_float32_networks_tolerance``: 1.6e-4 of the output's scale, on any CPU).

Every test here needs Keras: each asks for the ``keras`` fixture (tests/conftest.py), directly
or through keras_top / keras_notop, and is skipped on its own where Keras is not installed.

Why measured statistics: with statistics drawn at random (means ~N(0, 0.2), variances
U(0.5, 2)) the activations grow block by block (logits and features ~1e5..1e6), BN means
become negligible, and a loader that zeroed every conv5 BN mean still passed at 1e-4. With
the statistics on the scale of the activations, every BN layer normalises to O(1) and every
mean, variance and the epsilon count (logits and features are O(1..10)).
"""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import EPS32, fan_ins, two_float32_networks_tolerance  # noqa: E402
from jaxcnn.models.resnet import KERAS_LAYER_ORDER, ResNet50  # noqa: E402
from jaxcnn.preprocess import caffe_preprocess  # noqa: E402
from jaxcnn.weights.keras_h5 import load_keras_h5  # noqa: E402

# every conv's and dense layer's sum size (the shapes do not depend on the input size)
RESNET50_SUMS = fan_ins(jax.eval_shape(lambda: ResNet50(include_top=True).init(
    jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"])
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


def randomize(model, seed):
    """Random values for every weight but the BN moving statistics (see calibrate_bn)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape, name = tuple(w.shape), w.path.rsplit("/", 1)[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name == "gamma":
            v = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "beta"):
            v = rng.normal(0.0, 0.2, shape)
        elif name in ("moving_mean", "moving_variance"):
            continue  # set by calibrate_bn
        else:
            raise AssertionError(f"unexpected Keras weight {w.path}")
        w.assign(v.astype(np.float32))


def calibrate_bn(model, x, seed):
    """Set every BN layer's moving mean / variance to the statistics of its input on ``x``, perturbed.

    One forward pass with ``training=True`` (every BN normalises with its batch statistics, so
    the activations stay O(1) whatever the random weights) collects each BN layer's input;
    per channel: moving_mean = mean + N(0, 0.3)·std, moving_variance = var · U(0.5, 2). The
    perturbation keeps inference mode (moving statistics) distinct from training mode; measured
    on a CPU, it also halves float32 round-off against Keras (about 2e-5 of the output's scale,
    4e-5 with N(0, 0.1) and U(0.8, 1.25)), while zeroed or misread statistics, or a wrong epsilon,
    still move the outputs by hundreds to thousands of times that.
    """
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 53
    probe = keras.Model(model.input, [layer.input for layer in bns])
    inputs = probe(x, training=True)
    rng = np.random.default_rng(seed)
    for layer, a in zip(bns, inputs):
        a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])  # (N·H·W, C)
        mean, var = a.mean(axis=0), a.var(axis=0)
        assert var.min() > 1e-3, layer.name
        layer.moving_mean.assign((mean + rng.normal(0.0, 0.3, mean.shape) * np.sqrt(var)).astype(np.float32))
        layer.moving_variance.assign((var * rng.uniform(0.5, 2.0, var.shape)).astype(np.float32))


def write_legacy_h5(model, path):
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def assert_close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.max(np.abs(want))
    # The reference is on the scale of real activations (not 1e8, where BN means do not matter).
    assert 0.1 < scale < 1e3, scale
    # Keras in float32 is the reference (DESIGN.md): both roundings, from eps32 and the network's sums
    np.testing.assert_allclose(got, want, rtol=0, atol=two_float32_networks_tolerance(RESNET50_SUMS, scale))


@pytest.fixture(scope="module")
def keras_top(tmp_path_factory, keras):
    # Logits (no softmax) so that the comparison is not flattened by a saturated softmax.
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    randomize(model, seed=1)
    calibrate_bn(model, images(2, 224, seed=101)[1], seed=11)
    path = tmp_path_factory.mktemp("h5") / "top.h5"
    write_legacy_h5(model, path)
    return model, path


@pytest.fixture(scope="module")
def keras_notop(tmp_path_factory, keras):
    model = keras.applications.ResNet50(weights=None, include_top=False)
    randomize(model, seed=2)
    calibrate_bn(model, images(2, 224, seed=102)[1], seed=12)
    path = tmp_path_factory.mktemp("h5") / "notop.h5"
    write_legacy_h5(model, path)
    return model, path


def images(n, size, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)
    return rgb, np.asarray(caffe_preprocess(rgb))


def test_layer_order_is_keras_order(keras_top, keras_notop, keras):
    # Keras numbers the input layer of a second model ("input_layer_1"): compare it by type.
    for model, n in ((keras_top[0], 177), (keras_notop[0], 175)):
        assert len(model.layers) == n
        assert isinstance(model.layers[0], keras.layers.InputLayer)
        assert tuple(l.name for l in model.layers[1:]) == KERAS_LAYER_ORDER[1:n]
    assert KERAS_LAYER_ORDER[99] == "conv4_block2_3_conv"


def test_caffe_preprocess_matches_keras(keras):
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    want = keras.applications.resnet50.preprocess_input(rgb.astype(np.float32).copy())
    np.testing.assert_allclose(np.asarray(caffe_preprocess(rgb)), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(caffe_preprocess(rgb.astype(np.float32))), want, rtol=0, atol=1e-5)
    # Hand-computed: a pure red pixel -> BGR (0, 0, 255) minus the BGR means.
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_allclose(np.asarray(caffe_preprocess(red))[0, 0], [-103.939, -116.779, 255 - 123.68], atol=1e-4)


def test_top_model_matches_keras_224(keras_top):
    model, path = keras_top
    variables = load_keras_h5(path, include_top=True)
    _, x = images(2, 224, seed=3)
    want = np.asarray(model(x, training=False))  # (2, 1000) logits
    got = ResNet50(include_top=True, classifier_activation=None).apply(variables, jnp.asarray(x), train=False)
    assert_close(got, want)
    # With Keras' default softmax on top: the softmax of those logits, against its float64 oracle.
    probs = np.asarray(ResNet50(include_top=True).apply(variables, jnp.asarray(x), train=False), np.float64)
    z = np.asarray(got, np.float64)
    p64 = np.exp(z - z.max(-1, keepdims=True))
    p64 /= p64.sum(-1, keepdims=True)
    # a sum of 1000 exponentials, each of z - max(z), an argument good to eps32 of the logits' span
    span = z.max(-1, keepdims=True) - z.min(-1, keepdims=True)
    tol = 4 * EPS32 * (np.sqrt(1000) + span) * p64
    assert np.all(np.abs(probs - p64) <= tol), np.max(np.abs(probs - p64) / tol)


def test_top_model_matches_keras_small(keras_top, keras):
    # Same weights in a Keras model built for 64×64 inputs.
    model, path = keras_top
    small = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    small.set_weights(model.get_weights())
    variables = load_keras_h5(path, include_top=True)
    _, x = images(1, 64, seed=4)
    got = ResNet50(include_top=True, classifier_activation=None).apply(variables, jnp.asarray(x), train=False)
    assert_close(got, np.asarray(small(x, training=False)))


@pytest.mark.parametrize("size", [224, 96])
def test_notop_model_matches_keras(keras_notop, size):
    model, path = keras_notop
    variables = load_keras_h5(path, include_top=False)
    _, x = images(1, size, seed=size)
    want = np.asarray(model(x, training=False))  # (1, size/32, size/32, 2048)
    got = ResNet50(include_top=False).apply(variables, jnp.asarray(x), train=False)
    assert_close(got, want)
    # The pooled variants are Keras' GlobalAverage/MaxPooling2D of the same map.
    avg = ResNet50(include_top=False, pooling="avg").apply(variables, jnp.asarray(x), train=False)
    mx = ResNet50(include_top=False, pooling="max").apply(variables, jnp.asarray(x), train=False)
    assert_close(avg, want.mean(axis=(1, 2)))
    assert_close(mx, want.max(axis=(1, 2)))


def test_converted_tree_is_exactly_the_keras_weights(keras_notop):
    model, path = keras_notop
    variables = load_keras_h5(path, include_top=False)
    flax_of = {"kernel": ("params", "kernel"), "bias": ("params", "bias"), "gamma": ("params", "scale"),
               "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"),
               "moving_variance": ("batch_stats", "var")}
    for w in model.weights:  # every array, bit for bit
        layer, name = w.path.rsplit("/", 1)
        col, flax_name = flax_of[name]
        np.testing.assert_array_equal(variables[col][layer][flax_name], np.asarray(w.numpy()), err_msg=w.path)
    n = sum(a.size for a in jax.tree.leaves(variables))
    assert n == model.count_params() == 23587712
