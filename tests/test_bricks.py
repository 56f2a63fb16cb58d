"""The shared model bricks: Keras' BatchNorm defaults and formula, settable per model; the flat
random draws give bitwise the values of JAX's and Flax's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import assert_close_to_float64
from jaxcnn import layers
from jaxcnn.models import BatchNorm, CifarCNN, ResNetTiny
from jaxcnn.models.bricks import glorot_uniform


@pytest.mark.parametrize("shape", [(3, 3, 3, 8), (7, 7, 3, 64), (1, 1, 64, 256), (512, 32), (5, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_glorot_uniform_is_bitwise_flax(shape, dtype):
    key = jax.random.key(sum(shape))
    want = nn.initializers.glorot_uniform()(key, shape, dtype)
    got = glorot_uniform(key, shape, dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (2, 1, 1, 5), (7,)])
def test_flat_bernoulli_is_bitwise_jax(shape):
    key = jax.random.key(3)
    np.testing.assert_array_equal(layers.bernoulli(key, 0.7, shape), jax.random.bernoulli(key, 0.7, shape))


def test_batchnorm_has_keras_defaults_and_formula():
    bn = BatchNorm(use_running_average=True)
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 5)).astype(np.float32)
    v = {"params": {"scale": rng.uniform(0.5, 1.5, 5).astype(np.float32),
                    "bias": rng.normal(0, 1, 5).astype(np.float32)},
         "batch_stats": {"mean": rng.normal(2, 1, 5).astype(np.float32),
                         "var": rng.uniform(0.001, 0.01, 5).astype(np.float32)}}  # small: epsilon matters
    p, s = jax.tree.map(lambda a: np.asarray(a, np.float64), (v["params"], v["batch_stats"]))  # float64 oracles
    x64 = x.astype(np.float64)
    want = (x64 - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["scale"] + p["bias"]  # Keras' inference formula
    # a few roundings of each value, whose terms are up to |x - mean| / sqrt(var + eps) * |scale| and |bias|
    terms = np.abs(x64 - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["scale"] + np.abs(p["bias"])
    assert_close_to_float64(bn.apply(v, x), want, 4, terms, what="inference")
    # training: the moving statistics move by (1 - momentum) toward the batch's (biased) ones
    _, upd = BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    assert_close_to_float64(upd["batch_stats"]["mean"], 0.99 * s["mean"] + 0.01 * x64.mean(0), (4, 2),
                            np.abs(s["mean"]) + 0.01 * np.abs(x64).mean(0), what="moving mean")
    # the batch variance: a mean of 4 squares of differences from the mean, which is itself a sum of 4
    assert_close_to_float64(upd["batch_stats"]["var"], 0.99 * s["var"] + 0.01 * x64.var(0), (4, 4, 2),
                            s["var"] + 0.01 * (x64**2).mean(0), what="moving variance")


@pytest.mark.parametrize("make, field, default", [
    (lambda **kw: CifarCNN(widths=(4,), dense_units=4, **kw), "bn_epsilon", 1e-3),
    (lambda **kw: CifarCNN(widths=(4,), dense_units=4, **kw), "bn_momentum", 0.99),
    (lambda **kw: ResNetTiny(**kw), "bn_epsilon", 1.001e-5),
    (lambda **kw: ResNetTiny(**kw), "bn_momentum", 0.99),
])
def test_models_pass_their_bn_settings_to_every_batchnorm(make, field, default):
    """Every BatchNorm of the model follows the model's setting (its default: Keras')."""
    assert getattr(make(), field) == default
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    seen = []

    def record(mdl, method):
        if isinstance(mdl, nn.BatchNorm):
            seen.append(getattr(mdl, field.replace("bn_", "")))
        return False

    model = make(**{field: 0.5})
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    model.apply(variables, x, train=False, capture_intermediates=record)
    assert seen and set(seen) == {0.5}
