"""The seed's own examples (questions 1-3), with answers computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import layers, reference

# Seed question 2: the 5x5 ramp X[i, j] = 5 i + j + 1 under the 3x3 "edge detector".
RAMP = np.arange(1, 26, dtype=np.float32).reshape(1, 5, 5, 1)
EDGE = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32).reshape(3, 3, 1, 1)
# Seed question 3: the 4x4 max-pool example.
POOL_X = np.array([[1, 3, 2, 4], [5, 6, 7, 8], [2, 1, 4, 3], [9, 8, 6, 5]], np.float32).reshape(1, 4, 4, 1)


def test_edge_filter_on_ramp_valid_is_zero():
    # The filter's weights sum to 0 and the ramp is linear, so 8 * centre equals the sum of
    # the 8 neighbours everywhere: the VALID output, (5 - 3) / 1 + 1 = 3 by 3, is all zeros.
    out = layers.conv2d(jnp.asarray(RAMP), jnp.asarray(EDGE), jnp.zeros(1), padding="VALID")
    assert out.shape == (1, 3, 3, 1)
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), np.zeros((3, 3)))
    ref, _ = reference.conv2d_forward(RAMP, EDGE, np.zeros(1))
    np.testing.assert_array_equal(ref[0, :, :, 0], np.zeros((3, 3)))


def test_edge_filter_on_ramp_same_border_by_hand():
    # With zero padding 1 the border sees missing neighbours; by hand:
    #   (0,0): 8*1 - (2 + 6 + 7)            = -7
    #   (0,1): 8*2 - (1 + 3 + 6 + 7 + 8)    = -9
    #   (0,2): 8*3 - (2 + 4 + 7 + 8 + 9)    = -6
    #   (1,0): 8*6 - (1 + 2 + 7 + 11 + 12)  = 15
    #   (4,4): 8*25 - (19 + 20 + 24)        = 137
    out = np.asarray(layers.conv2d(jnp.asarray(RAMP), jnp.asarray(EDGE), padding=1))[0, :, :, 0]
    assert out[0, 0] == -7 and out[0, 1] == -9 and out[0, 2] == -6
    assert out[1, 0] == 15 and out[4, 4] == 137
    np.testing.assert_array_equal(out[1:4, 1:4], np.zeros((3, 3)))  # interior as in VALID
    np.testing.assert_array_equal(out, np.asarray(layers.conv2d(jnp.asarray(RAMP), jnp.asarray(EDGE)))[0, :, :, 0])


def test_seed_max_pool_example():
    out = layers.max_pool2d(jnp.asarray(POOL_X), 2, stride=2)
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[6, 8], [9, 6]])
    ref, _ = reference.max_pool2d_forward(POOL_X)
    np.testing.assert_array_equal(ref[0, :, :, 0], [[6, 8], [9, 6]])


def test_seed_max_pool_gradient_goes_to_argmax():
    g = jax.grad(lambda x: layers.max_pool2d(x).sum())(jnp.asarray(POOL_X))[0, :, :, 0]
    expected = np.zeros((4, 4), np.float32)
    expected[1, 1] = expected[1, 3] = expected[3, 0] = expected[3, 2] = 1.0  # the 6, 8, 9, 6
    np.testing.assert_array_equal(np.asarray(g), expected)


def test_seed_dropout_example():
    # x = [[1..4], [5..8]], p = 0.5: every output is 0 or 2x; inference returns x.
    x = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4)
    y = np.asarray(layers.dropout(x, 0.5, key=jax.random.key(0), train=True))
    assert np.all((y == 0) | (y == 2 * np.asarray(x)))
    assert 0 < np.count_nonzero(y) < 8
    np.testing.assert_array_equal(np.asarray(layers.dropout(x, 0.5, train=False)), np.asarray(x))
