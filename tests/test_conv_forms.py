"""Every formulation of the stride-1 convolution (``jaxcnn.conv_forms``), value, input gradient and
kernel gradient, against the float64 reference (``jaxcnn.reference``), SAME and VALID."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import conv_forms, reference
from jaxcnn.layers import resolve_padding
from float64_oracle import C, assert_close_to_float64

CASES = [  # n, h, w, c_in, c_out, kernel, padding
    (2, 7, 6, 3, 4, (3, 3), "SAME"),
    (2, 8, 9, 5, 3, (3, 3), "VALID"),
    (2, 6, 7, 2, 3, (2, 3), "SAME"),  # even kernel: SAME pads more at the bottom / right
]


def winograd_growth(m: int) -> float:
    """How much larger than the direct form's terms F(m, 3)'s intermediate values can get, per axis:
    for inputs and kernel of one sign, an output's ``Σ_i |A^T_pi| (|G| 1)_i (|B^T| 1)_i`` over its
    direct sum of 3 terms, the largest over the tile's outputs (F(2, 3): 8/3; F(4, 3): 16). Every
    rounding of the transforms and products is relative to these values, so the float32 tolerance
    of a 3×3 Winograd form is the direct one times ``growth**2`` (two axes)."""
    bt, g, at = (np.abs(np.asarray(a, np.float64)) for a in conv_forms._WINOGRAD[m])
    return float((at @ (g.sum(1) * bt.sum(1))).max() / 3)


def test_winograd_growth_is_the_hand_value():
    assert winograd_growth(2) == pytest.approx(8 / 3) and winograd_growth(4) == pytest.approx(16)


GROWTH = {"winograd": winograd_growth(2) ** 2, "winograd4": winograd_growth(4) ** 2}


@pytest.mark.parametrize("name", sorted(conv_forms.FORMS))
@pytest.mark.parametrize("n,h,w,cin,cout,k,padding", CASES)
def test_every_form_matches_the_float64_convolution_and_its_gradients(name, n, h, w, cin, cout, k, padding):
    if name.startswith("winograd") and k != (3, 3):
        with pytest.raises(ValueError, match="3x3"):
            conv_forms.FORMS[name](jnp.ones((n, h, w, cin)), jnp.ones((*k, cin, cout)), ((0, 0), (0, 0)), None)
        return
    rng = np.random.default_rng(hash((n, h, w, cin, cout, k)) % 2**32)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    wt = rng.standard_normal((*k, cin, cout)).astype(np.float32)
    pads = resolve_padding(padding, (h, w), k, (1, 1))
    form = functools.partial(conv_forms.FORMS[name], pads=pads, precision=None)
    y, vjp = jax.vjp(form, jnp.asarray(x), jnp.asarray(wt))
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = vjp(jnp.asarray(g))

    x64, w64, g64 = (a.astype(np.float64) for a in (x, wt, g))
    cache = (x64, w64, None, (1, 1), pads, (1, 1))
    sq_cache = (x64**2, w64**2, None, (1, 1), pads, (1, 1))
    y64, _ = reference.conv2d_forward_by_taps(x64, w64, None, (1, 1), pads, (1, 1))
    y2, _ = reference.conv2d_forward_by_taps(x64**2, w64**2, None, (1, 1), pads, (1, 1))
    dx64, dw64, _ = reference.conv2d_backward_by_taps(g64, cache)
    dx2, dw2, _ = reference.conv2d_backward_by_taps(g64**2, sq_cache)
    kh, kw = k
    c = C * GROWTH.get(name, 1.0)
    assert_close_to_float64(y, y64, kh * kw * cin, np.sqrt(y2), c=c, what=f"{name} value")
    assert_close_to_float64(dx, dx64, kh * kw * cout, np.sqrt(dx2), c=c, what=f"{name} input gradient")
    assert_close_to_float64(dw, dw64, n * y.shape[1] * y.shape[2], np.sqrt(dw2), c=c, what=f"{name} kernel gradient")
