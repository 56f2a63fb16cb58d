"""CifarCNN against the seed's Keras model: parameter counts, and the same outputs with the same weights."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported anywhere

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.models.cifar_cnn import CifarCNN, count_params


def _seed_keras_model():
    """Question 4's model, exactly as the seed writes it (Keras 3, JAX backend)."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(32, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Conv2D(64, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(64, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Conv2D(128, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(128, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.BatchNormalization(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])


@pytest.fixture(scope="module")
def keras_model():
    pytest.importorskip("keras")
    return _seed_keras_model()


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


def test_same_weights_same_outputs_as_keras(keras_model, flax_variables):
    """Copy Flax's weights (BN statistics randomised) into Keras: softmax(logits) == Keras' inference output."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(np.asarray, flax_variables["params"])
    stats = jax.tree.map(np.asarray, flax_variables["batch_stats"])
    weights = []
    for name in _flax_layer_order():
        if "bn" in name:
            n = params[name]["scale"].shape[0]
            params[name] = {"scale": rng.uniform(0.5, 1.5, n).astype(np.float32),
                            "bias": rng.normal(0, 0.1, n).astype(np.float32)}
            stats[name] = {"mean": rng.normal(0, 0.1, n).astype(np.float32),
                           "var": rng.uniform(0.5, 2.0, n).astype(np.float32)}
            weights += [params[name]["scale"], params[name]["bias"], stats[name]["mean"], stats[name]["var"]]
        else:
            weights += [params[name]["kernel"], params[name]["bias"]]
    keras_model.set_weights(weights)
    x = rng.uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(keras_model(x, training=False))
    logits = CifarCNN().apply({"params": params, "batch_stats": stats}, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), expected, rtol=1e-4, atol=1e-6)


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
