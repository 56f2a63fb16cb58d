"""Statistics and exact properties of dropout, spatial dropout and DropBlock."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import layers, reference

Z = 5.0  # width of the binomial confidence bound, in standard deviations


def _bound(p, n):
    return Z * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_zero_fraction_and_mean(rate):
    x = jnp.ones((200, 500))
    y = np.asarray(jax.jit(functools.partial(layers.dropout, rate=rate, train=True))(x, key=jax.random.key(1)))
    n = y.size
    assert abs((y == 0).mean() - rate) < _bound(rate, n)
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - rate), rtol=1e-6)  # inverted scaling
    # E[y] = 1: the mean of n scaled Bernoulli(1 - rate) draws, sd sqrt(rate / ((1 - rate) n)).
    assert abs(y.mean() - 1.0) < Z * np.sqrt(rate / ((1 - rate) * n))


def test_dropout_keys_and_modes():
    x = jnp.arange(1.0, 1001.0)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = layers.dropout(x, 0.5, key=k1, train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(layers.dropout(x, 0.5, key=k1, train=True)))
    assert not np.array_equal(np.asarray(a), np.asarray(layers.dropout(x, 0.5, key=k2, train=True)))
    assert layers.dropout(x, 0.5, train=False) is x  # inference: identity, no key needed
    assert layers.dropout(x, 0.0, key=k1, train=True) is x
    z = layers.dropout(x, 1.0, key=k1, train=True)
    np.testing.assert_array_equal(np.asarray(z), np.zeros(1000))
    g = jax.grad(lambda v: layers.dropout(v, 1.0, key=k1, train=True).sum())(x)
    assert np.all(np.isfinite(np.asarray(g))) and not np.any(np.asarray(g))


def test_dropout_gradient_is_the_reference_mask():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (8, 16)), jnp.float32)
    key, rate = jax.random.key(3), 0.3
    y, vjp = jax.vjp(lambda v: layers.dropout(v, rate, key=key, train=True), x)
    mask = (np.asarray(y) != 0) / (1 - rate)  # x has no zeros, so the mask is visible in y
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) * mask, rtol=1e-6)
    dout = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dout))[0]), reference.dropout_backward(dout, mask), rtol=1e-6)


def test_reference_dropout_statistics():
    out, mask = reference.dropout_forward(np.ones((100, 100)), p=0.25, rng=np.random.default_rng(0))
    assert abs((out == 0).mean() - 0.25) < _bound(0.25, 10_000)
    assert set(np.unique(mask)) <= {0.0, 1 / 0.75}
    assert reference.dropout_forward(np.ones(3), 0.5, training=False)[1] is None


def test_spatial_dropout_drops_whole_maps():
    rate = 0.25
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (64, 6, 5, 128)), jnp.float32)
    y = np.asarray(layers.spatial_dropout2d(x, rate, key=jax.random.key(0), train=True))
    zero_maps = (y == 0).all(axis=(1, 2))  # (N, C)
    live_maps = (y != 0).all(axis=(1, 2))
    assert np.all(zero_maps | live_maps), "a feature map was partly dropped"
    assert abs(zero_maps.mean() - rate) < _bound(rate, zero_maps.size)
    live = live_maps[:, None, None, :]  # (N, 1, 1, C), broadcasts over H, W
    np.testing.assert_allclose(np.where(live, y, 0), np.where(live, np.asarray(x) / (1 - rate), 0), rtol=1e-6)
    # Different examples get different channel masks.
    assert not np.array_equal(zero_maps[0], zero_maps[1])
    assert layers.spatial_dropout2d(x, rate, train=False) is x
    np.testing.assert_array_equal(np.asarray(layers.spatial_dropout2d(x, 1.0, key=jax.random.key(0), train=True)), 0)


def _union_of_blocks(zero, bs):
    """Every zero pixel must lie in a fully zero bs x bs square: rebuild the zero set from those squares."""
    n, h, w, c = zero.shape
    full = np.ones((n, h - bs + 1, w - bs + 1, c), bool)
    for i in range(bs):
        for j in range(bs):
            full &= zero[:, i : i + h - bs + 1, j : j + w - bs + 1, :]
    rebuilt = np.zeros_like(zero)
    for i in range(bs):
        for j in range(bs):
            rebuilt[:, i : i + h - bs + 1, j : j + w - bs + 1, :] |= full
    return rebuilt


def _expected_dropblock_fraction(rate, bs, h, w):
    """P(dropped) per position = 1 - (1 - γ)^(number of seed positions whose block covers it)."""
    gamma = layers.dropblock_gamma(rate, (bs, bs), (h, w))
    cov_h = np.array([min(y, h - bs) - max(y - bs + 1, 0) + 1 for y in range(h)])
    cov_w = np.array([min(x, w - bs) - max(x - bs + 1, 0) + 1 for x in range(w)])
    return float(np.mean(1 - (1 - gamma) ** np.outer(cov_h, cov_w)))


@pytest.mark.parametrize("rate,bs,hw", [(0.1, 3, 16), (0.2, 5, 16), (0.1, 7, 32)])
def test_dropblock_contiguous_blocks_and_rate(rate, bs, hw):
    x = jnp.ones((16, hw, hw, 32))
    f = jax.jit(functools.partial(layers.dropblock, rate=rate, block_size=bs, train=True))
    y = np.asarray(f(x, key=jax.random.key(7)))
    zero = y == 0
    np.testing.assert_array_equal(_union_of_blocks(zero, bs), zero)
    frac = zero.mean()
    expected = _expected_dropblock_fraction(rate, bs, hw, hw)
    assert abs(expected - rate) < 0.2 * rate  # γ from eq. 1 gives about `rate`
    # Pixels of one block are dropped together, so use the seed count for the bound.
    n_eff = zero.size / (bs * bs)
    assert abs(frac - expected) < Z * np.sqrt(expected * (1 - expected) / n_eff)
    np.testing.assert_allclose(y.mean(), 1.0, rtol=1e-5)  # renormalised: the mean is preserved
    np.testing.assert_allclose(np.unique(y[~zero]), [zero.size / (~zero).sum()], rtol=1e-5)


def test_dropblock_modes_and_edges():
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (4, 8, 8, 3)), jnp.float32)
    k = jax.random.key(0)
    assert layers.dropblock(x, 0.3, block_size=3, train=False) is x
    assert layers.dropblock(x, 0.0, block_size=3, key=k, train=True) is x
    np.testing.assert_array_equal(np.asarray(layers.dropblock(x, 1.0, key=k, train=True)), 0)
    g = jax.grad(lambda v: layers.dropblock(v, 1.0, key=k, train=True).sum())(x)
    assert np.all(np.isfinite(np.asarray(g)))
    # Same key, same blocks; another key, other blocks.
    a = layers.dropblock(x, 0.3, block_size=3, key=k, train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(layers.dropblock(x, 0.3, block_size=3, key=k, train=True)))
    assert not np.array_equal(np.asarray(a), np.asarray(layers.dropblock(x, 0.3, block_size=3, key=jax.random.key(1), train=True)))
    # A block larger than the map is clipped to the map: whole maps are dropped.
    y = np.asarray(layers.dropblock(x, 0.5, block_size=20, key=k, train=True))
    assert np.all((y == 0).all(axis=(1, 2)) | (y != 0).all(axis=(1, 2)))
    # block_size 1 is plain dropout at rate γ = rate.
    assert layers.dropblock_gamma(0.3, (1, 1), (8, 8)) == pytest.approx(0.3)


def test_dropout_family_gradients_are_mask_times_scale():
    x = jnp.asarray(np.random.default_rng(2).uniform(1, 2, (2, 8, 8, 4)), jnp.float32)
    k = jax.random.key(5)
    for f in (layers.spatial_dropout2d, functools.partial(layers.dropblock, block_size=3)):
        y, vjp = jax.vjp(lambda v: f(v, 0.3, key=k, train=True), x)
        scale = np.where(np.asarray(y) != 0, np.asarray(y) / np.asarray(x), 0.0)
        dout = np.ones(x.shape, np.float32)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dout))[0]), scale, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dropout_family_low_precision(dtype):
    x = jnp.ones((8, 8, 8, 8), dtype)
    k = jax.random.key(0)
    for f in (layers.dropout, layers.spatial_dropout2d, functools.partial(layers.dropblock, block_size=3)):
        y = jax.jit(lambda v: f(v, 0.5, key=k, train=True))(x)
        assert y.dtype == dtype and np.all(np.isfinite(np.asarray(y, np.float32)))
