"""Bad input gets a clear error that names the argument and the value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import layers

X = jnp.ones((2, 8, 8, 3))
W = jnp.ones((3, 3, 3, 4))
KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: layers.conv2d(jnp.ones((8, 8, 3)), W), ValueError, r"x must have rank 4.*\(8, 8, 3\)"),
        (lambda: layers.conv2d(X, jnp.ones((3, 3, 4))), ValueError, r"w must have rank 4"),
        (lambda: layers.conv2d(X, jnp.ones((3, 3, 4, 4))), ValueError, r"x has 3 channels but w expects 4"),
        (lambda: layers.conv2d(X, W, jnp.ones(3)), ValueError, r"b has shape \(3,\).*4 output channels"),
        (lambda: layers.conv2d(X, W, stride=0), ValueError, r"stride must be positive, got 0"),
        (lambda: layers.conv2d(X, W, stride=(1, -2)), ValueError, r"stride must be positive"),
        (lambda: layers.conv2d(X, W, dilation=0), ValueError, r"dilation must be positive, got 0"),
        (lambda: layers.conv2d(X, W, stride=1.5), TypeError, r"stride must be a positive int"),
        (lambda: layers.conv2d(X, W, padding="FULL"), ValueError, r"padding must be 'SAME', 'VALID'.*'FULL'"),
        (lambda: layers.conv2d(X, W, padding=-1), ValueError, r"padding must be non-negative, got -1"),
        (lambda: layers.conv2d(X, W, padding=(1, 2, 3)), TypeError, r"padding must be"),
        (lambda: layers.conv2d(X, jnp.ones((9, 9, 3, 4)), padding="VALID"), ValueError, r"kernel \(9 along height\) is larger than the padded input"),
        (lambda: layers.conv2d(X, W, padding="VALID", dilation=4), ValueError, r"dilated kernel \(9 along height\)"),
        (lambda: layers.conv2d(jnp.ones((2, 8, 8, 3), jnp.uint8), W), TypeError, r"x must be a floating-point array.*uint8"),
        (lambda: layers.conv2d(jnp.ones((2, 8, 8, 3), jnp.int32), W), TypeError, r"x must be a floating-point array.*int32"),
        (lambda: layers.conv2d(X, W.astype(jnp.bfloat16)), TypeError, r"x is float32 but w is bfloat16"),
        (lambda: layers.conv2d(np.ones((2, 8, 8, 3), np.float32).tolist(), W), TypeError, r"x must be an array, got list"),
        (lambda: layers.max_pool2d(X, 0), ValueError, r"window must be positive, got 0"),
        (lambda: layers.max_pool2d(X, 2, stride=0), ValueError, r"stride must be positive, got 0"),
        (lambda: layers.max_pool2d(X, 9), ValueError, r"window \(9 along height\) is larger than the padded input \(8"),
        (lambda: layers.avg_pool2d(X, (2, 10)), ValueError, r"window \(10 along width\)"),
        (lambda: layers.max_pool2d(jnp.ones((8, 8, 3)), 2), ValueError, r"x must have rank 4"),
        (lambda: layers.avg_pool2d(jnp.ones((2, 8, 8, 3), jnp.uint8), 2), TypeError, r"floating-point.*uint8"),
        (lambda: layers.global_avg_pool2d(jnp.ones((8, 3))), ValueError, r"rank 4"),
        (lambda: layers.dropout(X, 1.5, key=KEY, train=True), ValueError, r"rate .*must be in \[0, 1\], got 1.5"),
        (lambda: layers.dropout(X, -0.1, key=KEY, train=True), ValueError, r"got -0.1"),
        (lambda: layers.dropout(X, float("nan"), key=KEY, train=True), ValueError, r"got nan"),
        (lambda: layers.dropout(X, "0.5", key=KEY, train=True), TypeError, r"rate must be a Python float"),
        (lambda: layers.dropout(X, 0.5, train=True), ValueError, r"train=True needs a PRNG key"),
        (lambda: layers.dropout(X, 0.5, key=KEY, train=jnp.array(True)), TypeError, r"train must be a Python bool"),
        (lambda: layers.dropout(jnp.ones(4, jnp.int32), 0.5, key=KEY, train=True), TypeError, r"floating-point.*int32"),
        (lambda: layers.spatial_dropout2d(jnp.ones((8, 8)), 0.5, key=KEY, train=True), ValueError, r"x must have rank 4"),
        (lambda: layers.spatial_dropout2d(X, 0.5, train=True), ValueError, r"needs a PRNG key"),
        (lambda: layers.dropblock(X, 0.5, block_size=0, key=KEY, train=True), ValueError, r"block_size must be a positive int, got 0"),
        (lambda: layers.dropblock(X, 2.0, key=KEY, train=True), ValueError, r"rate .*got 2.0"),
        (lambda: layers.dropblock(X, 0.5, train=True), ValueError, r"needs a PRNG key"),
    ],
)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_rate_one_without_key_still_needs_key_but_inference_does_not():
    # Inference never needs a key, whatever the rate.
    assert layers.dropout(X, 1.0, train=False) is X
    with pytest.raises(ValueError, match="key"):
        layers.dropout(X, 1.0, train=True)
