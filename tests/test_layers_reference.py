"""jaxcnn.layers against the plain NumPy loops in jaxcnn.reference: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxcnn import layers, reference
from jaxcnn.layers import resolve_padding
from float64_oracle import assert_close_to_float64


def _conv_case(seed, n, h, w, cin, cout, k, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, cin)).astype(dtype)
    wt = rng.standard_normal((k[0], k[1], cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    return x, wt, b


def _explicit(padding, hw, k, stride, dilation):
    k_eff = tuple((kk - 1) * d + 1 for kk, d in zip(k, dilation))
    return resolve_padding(padding, hw, k_eff, stride)


def _assert_conv_matches_loops(got, x, wt, b, stride, pads, dilation):
    """A float32 convolution against the reference loops in float64, at the tolerance of a sum of
    ``kh * kw * C_in`` products and the bias (``float64_oracle``)."""
    x, wt, b = (np.asarray(a, np.float64) for a in (x, wt, b))
    ref, _ = reference.conv2d_forward(x, wt, b, stride, pads, dilation)
    sq, _ = reference.conv2d_forward(x**2, wt**2, b**2, stride, pads, dilation)  # each output's sum of squared terms
    assert got.dtype == jnp.float32
    assert_close_to_float64(got, ref, wt.shape[0] * wt.shape[1] * wt.shape[2] + 1, np.sqrt(sq), what="conv2d")


CONV_GRID = [
    # (h, w, cin, cout, kernel, stride, padding, dilation)
    (5, 5, 1, 1, (3, 3), (1, 1), "VALID", (1, 1)),
    (7, 9, 3, 4, (3, 3), (1, 1), "SAME", (1, 1)),
    (8, 8, 2, 3, (3, 3), (2, 2), "SAME", (1, 1)),
    (9, 7, 2, 2, (5, 5), (2, 2), "SAME", (1, 1)),
    (9, 9, 3, 2, (3, 3), (1, 1), "SAME", (2, 2)),
    (11, 10, 2, 3, (3, 2), (3, 2), 1, (1, 1)),
    (7, 7, 1, 2, (1, 1), (2, 2), "VALID", (1, 1)),
    (6, 8, 3, 1, (2, 3), (1, 2), (1, 2), (2, 1)),
    (10, 10, 2, 2, (7, 7), (2, 2), 3, (1, 1)),  # ResNet's stem shape: pad 3, 7x7/2
    (8, 7, 2, 2, (3, 3), (2, 1), ((0, 2), (1, 0)), (1, 1)),
    (13, 11, 4, 5, (3, 3), (2, 3), "VALID", (2, 1)),
]


@pytest.mark.parametrize("h,w,cin,cout,k,stride,padding,dilation", CONV_GRID)
def test_conv2d_matches_reference_float32(h, w, cin, cout, k, stride, padding, dilation):
    x, wt, b = _conv_case(0, 2, h, w, cin, cout, k, np.float32)
    got = layers.conv2d(jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b), stride=stride, padding=padding, dilation=dilation)
    _assert_conv_matches_loops(got, x, wt, b, stride, _explicit(padding, (h, w), k, stride, dilation), dilation)


@pytest.mark.parametrize("h,w,cin,cout,k,stride,padding,dilation", CONV_GRID)
def test_conv2d_gradients_match_reference_backward(h, w, cin, cout, k, stride, padding, dilation):
    x, wt, b = _conv_case(1, 2, h, w, cin, cout, k)
    pads = _explicit(padding, (h, w), k, stride, dilation)
    out, cache = reference.conv2d_forward(x, wt, b, stride, pads, dilation)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dX, dW, db = reference.conv2d_backward(dout, cache)
    with jax.enable_x64(True):
        f = lambda x_, w_, b_: layers.conv2d(x_, w_, b_, stride=stride, padding=padding, dilation=dilation)
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b))
        gx, gw, gb = vjp(jnp.asarray(dout))
        np.testing.assert_allclose(np.asarray(y), out, rtol=1e-12, atol=1e-12)  # float64: tight
        np.testing.assert_allclose(np.asarray(gx), dX, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(gw), dW, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(gb), db, rtol=1e-10, atol=1e-10)


@given(
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.integers(1, 2),
    padding=st.one_of(st.sampled_from(["SAME", "VALID"]), st.integers(0, 2)),
    seed=st.integers(0, 2**16),
)
def test_conv2d_property_matches_reference(h, w, cin, cout, k, stride, dilation, padding, seed):
    if padding == "VALID" and min(h, w) < (k - 1) * dilation + 1:
        return  # that input is rejected; covered by the error tests
    x, wt, b = _conv_case(seed, 1, h, w, cin, cout, (k, k), np.float32)
    got = layers.conv2d(jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b), stride=stride, padding=padding, dilation=dilation)
    pads = _explicit(padding, (h, w), (k, k), stride, (dilation, dilation))
    _assert_conv_matches_loops(got, x, wt, b, stride, pads, (dilation, dilation))


def test_conv2d_same_matches_lax_same():
    # Our explicit SAME rule equals XLA's own "SAME" (odd extra padding bottom/right): on XLA's path, so that
    # the same arithmetic is compared bit for bit (oneDNN's rounding differs by CPU: 1e-6 apart on an AVX2 one)
    from jaxcnn import kernels

    x, wt, _ = _conv_case(3, 2, 10, 7, 3, 2, (4, 3), np.float32)
    with kernels.use("xla"):
        got = layers.conv2d(jnp.asarray(x), jnp.asarray(wt), stride=(3, 2), padding="SAME", dilation=(1, 2))
    want = jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(wt), (3, 2), "SAME", rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("stride,padding", [(2, "SAME"), (1, "SAME"), (1, ((2, 0), (1, 3)))])
def test_conv2d_check_grads(stride, padding):
    # stride 1 takes the CPU's kernel gradient by rows (inside a custom_jvp): forward
    # and reverse mode, to second order, against finite differences
    x, wt, b = _conv_case(4, 2, 6, 5, 2, 3, (3, 3))
    with jax.enable_x64(True):
        f = lambda x_, w_, b_: layers.conv2d(x_, w_, b_, stride=stride, padding=padding, dilation=1)
        check_grads(f, (jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b)), order=2, modes=("fwd", "rev"))


def _conv_oracle(x, w, b, stride, pads, dilation):
    """The float64 oracle (``reference.conv2d_forward_by_taps``) of a float32 convolution and each
    output's term norm, ``sqrt(conv(x**2, w**2) + b**2)`` (``float64_oracle``)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    b = None if b is None else np.asarray(b, np.float64)
    y, _ = reference.conv2d_forward_by_taps(x, w, b, stride, pads, dilation)
    y2, _ = reference.conv2d_forward_by_taps(x**2, w**2, None if b is None else b**2, stride, pads, dilation)
    return y, np.sqrt(y2)


def _conv_gradient_oracle(x, w, dout, stride, pads, dilation):
    """The float64 oracle (``reference.conv2d_backward_by_taps``) of a float32 convolution's input
    and kernel gradients for upstream ``dout``, with their term norms: ``(dx, dx_norm, dw, dw_norm)``."""
    x, w, dout = (np.asarray(a, np.float64) for a in (x, w, dout))
    dx, dw, _ = reference.conv2d_backward_by_taps(dout, (x, w, None, stride, pads, dilation))
    dx2, dw2, _ = reference.conv2d_backward_by_taps(dout**2, (x**2, w**2, None, stride, pads, dilation))
    return dx, np.sqrt(dx2), dw, np.sqrt(dw2)


def test_the_vectorised_reference_convolution_equals_the_loops():
    """``reference.conv2d_*_by_taps``, the float64 oracle at the models' shapes, against the loops."""
    for i, (h, w, cin, cout, k, stride, padding, dilation) in enumerate(CONV_GRID):
        x, wt, b = _conv_case(10 + i, 2, h, w, cin, cout, k)
        pads = _explicit(padding, (h, w), k, stride, dilation)
        out, cache = reference.conv2d_forward(x, wt, b, stride, pads, dilation)
        fast, fast_cache = reference.conv2d_forward_by_taps(x, wt, b, stride, pads, dilation)
        np.testing.assert_allclose(fast, out, rtol=1e-12, atol=1e-12)
        dout = np.random.default_rng(i).standard_normal(out.shape)
        for got, want in zip(reference.conv2d_backward_by_taps(dout, fast_cache), reference.conv2d_backward(dout, cache)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch,size,cin,cout", [(64, 32, 32, 32), (16, 8, 64, 128), (4, 7, 3, 5)])
def test_conv2d_kernel_gradient_by_rows_matches_float64(batch, size, cin, cout):
    """At the CIFAR CNN's shapes, in float32: the kernel gradient of the stride-1 path (rows of
    matrix products on the CPU) and the input gradient against the float64 oracle, at a tolerance
    from float32's epsilon and the size of each sum (``float64_oracle``). XLA's own float32
    gradients are held to the same tolerance: it is one a plain float32 convolution meets on any
    CPU. (XLA's gradient was once this test's oracle: on an AVX-512 CPU it is the further from
    float64 of the two, and the test failed.)"""
    rng = np.random.default_rng(batch + size)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.1)
    g = jnp.asarray(rng.standard_normal((batch, size, size, cout), np.float32))
    xla = lambda x_, w_: jax.lax.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x_, w_: layers.conv2d(x_, w_, padding="SAME")
    dx, dx_norm, dw, dw_norm = _conv_gradient_oracle(x, w, g, (1, 1), ((1, 1), (1, 1)), (1, 1))
    for name, f in (("jaxcnn", ours), ("XLA", xla)):
        gx, gw = jax.jit(lambda x_, w_, g_: jax.vjp(f, x_, w_)[1](g_))(x, w, g)
        assert gw.dtype == gx.dtype == jnp.float32
        # dW sums over the batch and the pixels; dx over the kernel taps and the output channels
        assert_close_to_float64(gw, dw, batch * size * size, dw_norm, what=f"{name}'s kernel gradient")
        assert_close_to_float64(gx, dx, 3 * 3 * cout, dx_norm, what=f"{name}'s input gradient")


def test_conv2d_under_jit_and_bfloat16():
    x, wt, b = _conv_case(5, 2, 8, 8, 3, 4, (3, 3), np.float32)
    f = jax.jit(lambda x_, w_, b_: layers.conv2d(x_, w_, b_, stride=1, padding="SAME"))
    ref, _ = reference.conv2d_forward(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64), (1, 1), ((1, 1), (1, 1)))
    _assert_conv_matches_loops(f(jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b)), x, wt, b, (1, 1), ((1, 1), (1, 1)), (1, 1))
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, wt, b))
    yb = f(xb, wb, bb)
    assert yb.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: a 27-term sum is good to about 1e-2 of its scale.
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, rtol=0, atol=0.1 * np.abs(ref).max())


POOL_GRID = [
    # (h, w, window, stride, padding)
    (4, 4, 2, None, "VALID"),
    (5, 7, 2, None, "VALID"),
    (7, 7, 3, 2, "SAME"),
    (6, 9, (3, 2), (2, 1), "SAME"),
    (8, 8, 3, 1, 1),
    (9, 5, (2, 3), (3, 2), ((1, 0), (0, 2))),
    (5, 5, 5, 1, "VALID"),
]


def _pool_case(h, w, window, stride, padding, seed=0, c=3):
    x = np.random.default_rng(seed).standard_normal((2, h, w, c))
    win = (window, window) if isinstance(window, int) else window
    st_ = win if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    pads = resolve_padding(padding, (h, w), win, st_)
    return x, win, st_, pads


@pytest.mark.parametrize("h,w,window,stride,padding", POOL_GRID)
def test_max_pool_matches_reference_and_routes_gradient(h, w, window, stride, padding):
    x, win, st_, pads = _pool_case(h, w, window, stride, padding)
    out, cache = reference.max_pool2d_forward(x, win, st_, pads)
    got = layers.max_pool2d(jnp.asarray(x, jnp.float32), window, stride=stride, padding=padding)
    np.testing.assert_allclose(np.asarray(got), out, rtol=1e-6)  # max is exact up to the cast
    dout = np.random.default_rng(1).standard_normal(out.shape)
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda x_: layers.max_pool2d(x_, window, stride=stride, padding=padding), jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), out)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dout))[0]), reference.max_pool2d_backward(dout, cache), rtol=1e-12)


@pytest.mark.parametrize("h,w,window", [(4, 4, 2), (6, 8, 2), (4, 6, (2, 3)), (9, 6, 3)])
def test_max_pool_over_tiling_windows_routes_tied_gradients_to_the_first_maximum(h, w, window):
    """Windows that tile the image (the CIFAR CNN's pools), on inputs full of ties: the gradient is
    the reference's (the first maximum in row-major order of each window), the tangent of each
    window comes from one input, and forward- and reverse-mode derivatives agree (check_grads)."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, (2, h, w, 3)).astype(np.float64)  # three values: most windows tie
    win = (window, window) if isinstance(window, int) else window
    out, cache = reference.max_pool2d_forward(x, win, win, ((0, 0), (0, 0)))
    dout = rng.standard_normal(out.shape)
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda x_: layers.max_pool2d(x_, window), jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), out)
        np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(dout))[0]), reference.max_pool2d_backward(dout, cache))
        _, tangent = jax.jvp(lambda x_: layers.max_pool2d(x_, window), (jnp.asarray(x),), (jnp.ones_like(x),))
        np.testing.assert_array_equal(np.asarray(tangent), np.ones(out.shape))  # one input per window counts
        check_grads(lambda x_: layers.max_pool2d(x_, window), (jnp.asarray(rng.standard_normal((1, h, w, 2))),),
                    order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("h,w,window,stride,padding", POOL_GRID)
def test_avg_pool_matches_reference_and_check_grads(h, w, window, stride, padding):
    x, win, st_, pads = _pool_case(h, w, window, stride, padding, seed=3)
    ref = reference.avg_pool2d_forward(x, win, st_, pads)
    got = layers.avg_pool2d(jnp.asarray(x, jnp.float32), window, stride=stride, padding=padding)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        f = lambda x_: layers.avg_pool2d(x_, window, stride=stride, padding=padding)
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), ref, rtol=1e-12)
        check_grads(f, (jnp.asarray(x),), order=2)


@given(
    h=st.integers(2, 9), w=st.integers(2, 9), window=st.integers(1, 3), stride=st.integers(1, 3),
    padding=st.sampled_from(["SAME", "VALID", 1]), seed=st.integers(0, 2**16),
)
def test_pools_property_match_reference(h, w, window, stride, padding, seed):
    if padding == 1 and window == 1:
        padding = "SAME"  # a 1x1 window over pure padding would be an all-padding window
    x, win, st_, pads = _pool_case(h, w, window, stride, padding, seed=seed, c=2)
    mx, _ = reference.max_pool2d_forward(x, win, st_, pads)
    np.testing.assert_allclose(np.asarray(layers.max_pool2d(jnp.asarray(x, jnp.float32), window, stride=stride, padding=padding)), mx, rtol=1e-6)
    av = reference.avg_pool2d_forward(x, win, st_, pads)
    np.testing.assert_allclose(np.asarray(layers.avg_pool2d(jnp.asarray(x, jnp.float32), window, stride=stride, padding=padding)), av, rtol=1e-5, atol=1e-6)


def test_global_pools():
    x = np.random.default_rng(0).standard_normal((3, 5, 4, 6)).astype(np.float32)
    x64 = x.astype(np.float64)
    # the float64 mean of 5 * 4 terms x / 20, whose 2-norm is sqrt(sum x**2) / 20
    mean, norm = x64.mean(axis=(1, 2)), np.sqrt((x64**2).sum(axis=(1, 2))) / 20
    assert_close_to_float64(layers.global_avg_pool2d(jnp.asarray(x)), mean, 20, norm, what="global average")
    np.testing.assert_array_equal(np.asarray(layers.global_max_pool2d(jnp.asarray(x))), x.max(axis=(1, 2)))
    # Global average pooling is the VALID average pool with the whole map as its window.
    assert_close_to_float64(np.asarray(layers.avg_pool2d(jnp.asarray(x), (5, 4)))[:, 0, 0, :], mean, 20, norm,
                            what="average pool")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_pools_keep_dtype_under_jit(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 2)), dtype)
    for f in (layers.max_pool2d, layers.avg_pool2d):
        y = jax.jit(lambda a: f(a, 3, stride=2, padding="SAME"))(x)
        assert y.dtype == dtype
    assert layers.global_avg_pool2d(x).dtype == dtype


def test_float64_paths_are_float64():
    x, wt, b = _conv_case(0, 1, 5, 5, 2, 2, (3, 3))
    with jax.enable_x64(True):
        for wrap in (lambda f: f, jax.jit):  # eagerly and under jit
            y = wrap(layers.conv2d)(jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b))
            assert y.dtype == jnp.float64
            for f in (layers.max_pool2d, layers.avg_pool2d):
                assert wrap(f)(jnp.asarray(x)).dtype == jnp.float64
            key = jax.random.key(0)
            for f in (layers.dropout, layers.spatial_dropout2d, layers.dropblock):
                g = wrap(functools.partial(f, rate=0.3, train=True))
                assert g(jnp.asarray(x), key=key).dtype == jnp.float64


def test_every_layer_differentiates_under_jit():
    """Regression: a traced init value once made lax.reduce_window non-differentiable under jit.
    The gradient of sum(f(x)**2), jitted and eager, against a float64 oracle: the convolution's from
    the reference, the pools' from the same layer in float64, and each dropout's from its mask
    (``f(x) = m * x``, so the gradient is ``2 m**2 x`` with ``m = f(ones)``)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 4)), jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    key = jax.random.key(0)
    fns = {
        "conv2d": lambda v: layers.conv2d(v, w, stride=2),
        "max_pool2d": lambda v: layers.max_pool2d(v, 3, stride=2, padding="SAME"),
        "avg_pool2d": lambda v: layers.avg_pool2d(v, 3, stride=2, padding="SAME"),
        "global_max_pool2d": layers.global_max_pool2d,
        "dropout": lambda v: layers.dropout(v, 0.5, key=key, train=True),
        "spatial_dropout2d": lambda v: layers.spatial_dropout2d(v, 0.5, key=key, train=True),
        "dropblock": lambda v: layers.dropblock(v, 0.3, block_size=3, key=key, train=True),
    }
    pads = resolve_padding("SAME", (8, 8), (3, 3), (2, 2))
    y64, _ = reference.conv2d_forward_by_taps(x64, w64, None, (2, 2), pads)
    oracles = {"conv2d": (reference.conv2d_backward_by_taps(2 * y64, (x64, w64, None, (2, 2), pads, (1, 1)))[0],
                          (27, 36))}  # y sums 3*3*3 terms, its input gradient at most 3*3*4
    with jax.enable_x64(True):
        for name, window in (("max_pool2d", 1), ("avg_pool2d", 9), ("global_max_pool2d", 1)):
            grad64 = jax.grad(lambda v: jnp.sum(fns[name](v) ** 2))(jnp.asarray(x64))
            assert grad64.dtype == jnp.float64
            oracles[name] = (np.asarray(grad64), (window, window))
    for name in ("dropout", "spatial_dropout2d", "dropblock"):
        m = np.asarray(fns[name](jnp.ones_like(x)), np.float64)
        oracles[name] = (2 * m**2 * x64, (1,))
    for name, f in fns.items():
        oracle, n_terms = oracles[name]
        for how, grad in (("jit", jax.jit(jax.grad(lambda v: jnp.sum(f(v) ** 2)))), ("eager", jax.grad(lambda v: jnp.sum(f(v) ** 2)))):
            assert_close_to_float64(grad(x), oracle, n_terms, np.abs(oracle).max(), what=f"{name}, {how}")
