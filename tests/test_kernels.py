"""The convolution kernels layer (``jaxcnn.kernels``): every direction of both backends against the
float64 reference (``jaxcnn.reference``) at size-derived tolerances, derivatives of every order and
mode, ``vmap``, the switch, the fallback's one line, and what a GPU program would run."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcnn import kernels, layers, reference
from jaxcnn.kernels import onednn, xla
from float64_oracle import assert_close_to_float64

HAVE_ONEDNN = onednn.load() is not None
BACKENDS = ["xla", pytest.param("onednn", marks=pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built"))]

CASES = [  # x shape, kernel (kh, kw, cout), stride, padding, dilation
    ((2, 7, 6, 3), (3, 3, 4), (1, 1), "SAME", (1, 1)),
    ((2, 8, 9, 5), (3, 3, 3), (1, 1), "VALID", (1, 1)),
    ((2, 6, 7, 2), (2, 3, 3), (1, 1), "SAME", (1, 1)),  # even kernel: SAME pads more at the bottom / right
    ((2, 9, 8, 3), (3, 3, 4), (2, 2), "VALID", (1, 1)),  # stride 2 leaves the last row unread: cropped
    ((2, 10, 11, 3), (3, 2, 5), (2, 3), ((1, 2), (0, 1)), (2, 1)),  # strides, dilation, uneven padding
    ((1, 12, 12, 4), (7, 7, 8), (2, 2), 3, (1, 1)),  # ResNet's stem: 7x7 stride 2, padding 3
]


def _conv(backend, stride, pads, dilation):
    if backend == "onednn":
        return functools.partial(onednn.conv2d, strides=stride, pads=pads, dilations=dilation)
    return functools.partial(xla.fwd, strides=stride, pads=pads, dilations=dilation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape,k,stride,padding,dilation", CASES)
def test_every_direction_matches_the_float64_convolution(backend, x_shape, k, stride, padding, dilation):
    kh, kw, cout = k
    rng = np.random.default_rng(sum(x_shape) * 31 + kh)
    x = rng.standard_normal(x_shape).astype(np.float32)
    wt = rng.standard_normal((kh, kw, x_shape[3], cout)).astype(np.float32)
    eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = layers.resolve_padding(padding, x_shape[1:3], eff, stride)
    f = jax.jit(_conv(backend, stride, pads, dilation))
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(wt))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = vjp(jnp.asarray(g))

    x64, w64, g64 = (a.astype(np.float64) for a in (x, wt, g))
    y64, cache = reference.conv2d_forward_by_taps(x64, w64, None, stride, pads, dilation)
    y2, sq_cache = reference.conv2d_forward_by_taps(x64**2, w64**2, None, stride, pads, dilation)
    dx64, dw64, _ = reference.conv2d_backward_by_taps(g64, cache)
    dx2, dw2, _ = reference.conv2d_backward_by_taps(g64**2, sq_cache)
    assert_close_to_float64(y, y64, kh * kw * x_shape[3], np.sqrt(y2), what=f"{backend} value")
    assert_close_to_float64(dx, dx64, kh * kw * cout, np.sqrt(dx2), what=f"{backend} input gradient")
    assert_close_to_float64(dw, dw64, x_shape[0] * y.shape[1] * y.shape[2], np.sqrt(dw2),
                            what=f"{backend} kernel gradient")


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
@pytest.mark.parametrize("case", [0, 4])
def test_onednn_derivatives_of_every_order_and_mode(case):
    """Each primitive's transposes are the other two: forward and reverse mode, to order 2."""
    x_shape, (kh, kw, cout), stride, padding, dilation = CASES[case]
    eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = layers.resolve_padding(padding, x_shape[1:3], eff, stride)
    rng = np.random.default_rng(case)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kh, kw, x_shape[3], cout)), jnp.float32)
    f = _conv("onednn", stride, pads, dilation)
    check_grads(lambda x, w: jnp.tanh(f(x, w)), (x, w), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
def test_onednn_second_derivatives_match_xla_within_float32():
    """A Hessian-vector product through both backends, against float64 XLA."""
    x_shape, (kh, kw, cout), stride, padding, dilation = CASES[4]
    eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = layers.resolve_padding(padding, x_shape[1:3], eff, stride)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((kh, kw, x_shape[3], cout)).astype(np.float32)

    def hvp(conv, x, w):
        loss = lambda x, w: jnp.sum(conv(x, w) ** 2)  # noqa: E731
        return jax.jvp(jax.grad(loss, (0, 1)), (x, w), (x, w))[1]

    got = jax.jit(functools.partial(hvp, _conv("onednn", stride, pads, dilation)))(x, w)
    with jax.enable_x64(True):
        want = hvp(_conv("xla", stride, pads, dilation), x.astype(np.float64), w.astype(np.float64))
    for a, b in zip(got, want):
        b = np.asarray(b)
        assert np.abs(np.asarray(a, np.float64) - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
def test_onednn_under_vmap_folds_the_batch_or_takes_xla():
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 2)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)
    pads = ((1, 1), (1, 1))
    on, ref = _conv("onednn", (1, 1), pads, (1, 1)), _conv("xla", (1, 1), pads, (1, 1))
    for axes in ((0, None), (None, 0), (0, 0)):
        a = jax.vmap(on, in_axes=axes)(xs if axes[0] == 0 else xs[0], ws if axes[1] == 0 else ws[0])
        b = jax.vmap(ref, in_axes=axes)(xs if axes[0] == 0 else xs[0], ws if axes[1] == 0 else ws[0])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # per-example kernel gradients (vmap of grad): the kernel gradient batched over examples
    per_ex = jax.vmap(jax.grad(lambda w, x: jnp.sum(on(x[None], w) ** 2)), in_axes=(None, 0))(ws[0], xs[0])
    per_ex_ref = jax.vmap(jax.grad(lambda w, x: jnp.sum(ref(x[None], w) ** 2)), in_axes=(None, 0))(ws[0], xs[0])
    np.testing.assert_allclose(per_ex, per_ex_ref, rtol=1e-5, atol=1e-4)


def _hlo(*args):
    """The compiled gradient of a conv2d loss; a new function each call (jit caches traces per function,
    and the backend is chosen at trace time)."""
    step = lambda x, w: jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w) ** 2), (0, 1))(x, w)  # noqa: E731
    return jax.jit(step).lower(*args).compile().as_text()


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
def test_the_switch_picks_the_backend(monkeypatch):
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))
    monkeypatch.setenv("JAXCNN_KERNELS", "onednn")
    on = _hlo(x, w)
    assert {"jaxcnn_conv_fwd", "jaxcnn_conv_bwd_data", "jaxcnn_conv_bwd_weights"} <= set(
        re.findall(r"custom_call_target=\"(jaxcnn_conv_\w+)\"", on))
    monkeypatch.setenv("JAXCNN_KERNELS", "xla")
    assert "jaxcnn_conv" not in _hlo(x, w)
    monkeypatch.setenv("JAXCNN_KERNELS", "auto")
    assert kernels.choose(jnp.float32) == ("onednn", None)
    assert kernels.choose(jnp.bfloat16)[0] == "xla" and "float32 only" in kernels.choose(jnp.bfloat16)[1]
    assert "jaxcnn_conv" not in _hlo(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    with kernels.use("xla"):
        assert kernels.choose(jnp.float32) == ("xla", None)
    assert kernels.choose(jnp.float32) == ("onednn", None)
    monkeypatch.setenv("JAXCNN_KERNELS", "fast")
    with pytest.raises(ValueError, match="JAXCNN_KERNELS must be one of auto, onednn, xla, got 'fast'"):
        layers.conv2d(x, w)


def test_without_the_kernels_auto_says_so_once_and_onednn_refuses(monkeypatch):
    monkeypatch.setattr(onednn, "_loaded", True)
    monkeypatch.setattr(onednn, "_module", None)
    monkeypatch.setattr(onednn, "_reason", "the compiled module did not build or load (no module named _onednn)")
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setenv("JAXCNN_KERNELS", "auto")
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = layers.conv2d(x, w)
        layers.conv2d(x, w, padding="VALID")
    lines = [str(s.message) for s in seen if issubclass(s.category, RuntimeWarning)]
    assert lines == ["jaxcnn: convolutions run on XLA's path: the oneDNN kernels are not available "
                     "(the compiled module did not build or load (no module named _onednn))"]
    np.testing.assert_allclose(y, xla.fwd(x, w, strides=(1, 1), pads=((1, 1), (1, 1)), dilations=(1, 1)))
    monkeypatch.setenv("JAXCNN_KERNELS", "onednn")
    with pytest.raises(RuntimeError, match="JAXCNN_KERNELS=onednn, but the oneDNN kernels are not available"):
        layers.conv2d(x, w)


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
def test_a_program_lowered_for_a_gpu_runs_xlas_convolution_there():
    """The primitives lower to XLA's convolution on every platform but the CPU (no GPU needed to look)."""
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    f = lambda x, w: jax.grad(lambda x, w: jnp.sum(onednn.conv2d(x, w, strides=(1, 1), pads=((1, 1), (1, 1)),  # noqa
                                                                  dilations=(1, 1)) ** 2), (0, 1))(x, w)
    traced = jax.jit(f).trace(x, w)
    gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxcnn_conv" not in gpu and gpu.count("stablehlo.convolution") == 3
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "stablehlo.convolution" not in cpu and cpu.count("@jaxcnn_conv_") == 3


@pytest.mark.skipif(not HAVE_ONEDNN, reason="kernels not built")
def test_impl_names_and_threads():
    names = onednn.impl_names((2, 8, 8, 16), (3, 3, 16, 16))
    assert set(names) == {"fwd", "bwd_data", "bwd_weights"} and all(names.values())
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        onednn.set_threads(0)
