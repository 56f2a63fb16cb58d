"""jaxcnn.data.augment against exact NumPy references and Keras' apply_affine_transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.data import augment
from jaxcnn.data.augment import affine_transform, random_augment
from float64_oracle import EPS32, float32_sum_tolerance


def _images(n=3, h=8, w=8, c=3, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, h, w, c)).astype(dtype)


def _np(x):
    return np.asarray(x.astype(jnp.float32))


def _bilinear_tolerance(x):
    """float32 bilinear resampling against float64: the source coordinates (sums of up to ``H + W``
    pixels, rotated by float32 cos / sin) are good to a few eps of ``H + W`` pixels, and a
    coordinate error of ``d`` pixels moves a value by at most ``d`` times the image's range."""
    h, w = x.shape[-3:-1] if x.ndim == 4 else x.shape[:2]
    return float(float32_sum_tolerance(4, np.ptp(np.asarray(x, np.float64)) * (h + w)))


def _np_affine(x, angle_deg, shift_x, shift_y, flip):
    """One image ``(H, W, C)``, float64, bilinear: the content turned by ``angle_deg`` counter-clockwise
    about the centre, then moved by ``(shift_x, shift_y)`` pixels (right, down), then mirrored if
    ``flip``; pixels from outside take the nearest edge pixel (Keras' fill_mode="nearest")."""
    h, w = x.shape[:2]
    yo, xo = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    xo = (w - 1) - xo if flip else xo
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dx, dy = xo - shift_x - cx, yo - shift_y - cy
    t = np.deg2rad(float(angle_deg))
    sx, sy = np.cos(t) * dx - np.sin(t) * dy + cx, np.sin(t) * dx + np.cos(t) * dy + cy  # where it came from
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
    at = lambda r, c: x[np.clip(r, 0, h - 1).astype(int), np.clip(c, 0, w - 1).astype(int)]  # noqa: E731
    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
            + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_zero_transform_is_exact_identity(dtype, interpolation):
    x = jnp.asarray(_images(h=7, w=10)).astype(dtype)
    out = affine_transform(x, 0.0, 0.0, 0.0, False, interpolation=interpolation)
    assert out.dtype == dtype
    np.testing.assert_array_equal(_np(out), _np(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flip_is_exact_mirror(dtype):
    x = jnp.asarray(_images(h=6, w=9)).astype(dtype)
    out = affine_transform(x, 0.0, 0.0, 0.0, True)
    np.testing.assert_array_equal(_np(out), _np(x)[:, :, ::-1, :])


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("angle, k", [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_right_angle_rotation_equals_rot90(size, angle, k, interpolation):
    # Convention: angle > 0 turns the content counter-clockwise as displayed, as np.rot90.
    x = _images(h=size, w=size)
    out = affine_transform(jnp.asarray(x), angle, 0.0, 0.0, False, interpolation=interpolation)
    np.testing.assert_allclose(np.asarray(out), np.rot90(x, k=k, axes=(1, 2)), rtol=0, atol=_bilinear_tolerance(x))


@pytest.mark.parametrize("sx, sy", [(3, 0), (-2, 0), (0, 2), (0, -3), (2, -1)])
def test_integer_shift_is_roll_with_edge_replication(sx, sy):
    x = _images(h=8, w=9)
    h, w = x.shape[1:3]
    # Content moves right by sx and down by sy; uncovered pixels copy the nearest edge.
    rows = np.clip(np.arange(h) - sy, 0, h - 1)
    cols = np.clip(np.arange(w) - sx, 0, w - 1)
    expected = x[:, rows][:, :, cols]
    for interpolation in ("nearest", "bilinear"):
        out = affine_transform(jnp.asarray(x), 0.0, float(sx), float(sy), False, interpolation=interpolation)
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_half_pixel_shift_bilinear_averages_neighbours():
    x = _images(h=5, w=6)
    cols = np.clip(np.arange(6) - 1, 0, 5)
    expected = 0.5 * (x + x[:, :, cols])
    out = affine_transform(jnp.asarray(x), 0.0, 0.5, 0.0, False, interpolation="bilinear")
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)


def test_flip_applies_after_shift():
    x = _images(h=5, w=6)
    shifted = affine_transform(jnp.asarray(x), 0.0, 2.0, 0.0, False)
    both = affine_transform(jnp.asarray(x), 0.0, 2.0, 0.0, True)
    np.testing.assert_array_equal(np.asarray(both), np.asarray(shifted)[:, :, ::-1])


def test_per_example_parameters_match_one_at_a_time():
    x = jnp.asarray(_images(n=4, h=9, w=9))
    angle = jnp.array([0.0, 90.0, 12.5, -7.0])
    sx, sy = jnp.array([0.0, 1.0, -2.3, 0.4]), jnp.array([1.0, 0.0, 0.7, -3.1])
    flip = jnp.array([True, False, True, False])
    batched = affine_transform(x, angle, sx, sy, flip)
    for i in range(4):
        single = affine_transform(x[i:i + 1], angle[i], sx[i], sy[i], flip[i])
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single[0]))


@pytest.mark.parametrize("theta, tx, ty", [(0.0, 2.0, 0.0), (0.0, 0.0, -1.5), (15.0, 0.0, 0.0),
                                           (-11.0, 1.5, -2.25), (30.0, -3.2, 2.9)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras calls scipy.ndimage.interpolation
def test_bilinear_matches_keras_apply_affine_transform(theta, tx, ty):
    """Keras (scipy.ndimage) on the float64 image is the float64 oracle; so is _np_affine, checked here."""
    image_lib = pytest.importorskip("keras.src.legacy.preprocessing.image")
    x = _images(n=1, h=12, w=12, c=2, seed=3)[0]
    ref = image_lib.apply_affine_transform(x.astype(np.float64), theta=theta, tx=tx, ty=ty, row_axis=0, col_axis=1,
                                           channel_axis=2, fill_mode="nearest", order=1)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(_np_affine(x.astype(np.float64), theta, -tx, -ty, False), ref, rtol=0, atol=1e-12)
    # Keras' tx/ty give the output->input offset along columns/rows: the content moves by -tx, -ty.
    out = affine_transform(jnp.asarray(x[None]), theta, -tx, -ty, False, interpolation="bilinear")
    np.testing.assert_allclose(np.asarray(out[0]), ref, rtol=0, atol=_bilinear_tolerance(x))


def test_random_augment_same_key_same_batch_other_key_different():
    x = jnp.asarray(_images(n=16, h=16, w=16))
    a = random_augment(jax.random.key(0), x)
    b = random_augment(jax.random.key(0), x)
    c = random_augment(jax.random.key(1), x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_random_augment_stays_in_range_and_jits(dtype, interpolation, monkeypatch):
    x = (jnp.asarray(_images(n=8, h=12, w=12)) * 4.0 - 1.0).astype(dtype)   # values in [-1, 3]
    fn = functools.partial(random_augment, rotation=30.0, width_shift=0.2, height_shift=0.2,
                           interpolation=interpolation)
    drawn = []  # the parameters random_augment draws, seen on their way to affine_transform (eagerly)
    monkeypatch.setattr(augment, "affine_transform",
                        lambda images, *params, **kw: drawn.append(params) or affine_transform(images, *params, **kw))
    eager = fn(jax.random.key(5), x)
    jitted = jax.jit(fn)(jax.random.key(5), x)
    assert eager.dtype == dtype and eager.shape == x.shape
    if interpolation == "nearest":  # copies input values: the same ones, jitted or not
        np.testing.assert_array_equal(_np(eager), _np(jitted))
    else:  # each against float64 (the same key draws the same parameters, jitted or not)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        want = np.stack([_np_affine(x64[i], *(np.asarray(p)[i] for p in drawn[0])) for i in range(x.shape[0])])
        # bfloat16 output: one rounding to 8 bits of mantissa on top of float32's error
        tol = _bilinear_tolerance(x64) + (0.0 if dtype == jnp.float32 else 2.0**-8 * np.abs(x64).max())
        for got in (eager, jitted):
            np.testing.assert_allclose(_np(got), want, rtol=0, atol=tol)
    assert _np(eager).min() >= _np(x).min() and _np(eager).max() <= _np(x).max()
    if interpolation == "nearest":  # every output value is an input value of the same image
        for i in range(x.shape[0]):
            assert np.isin(_np(eager[i]), _np(x[i])).all()


def test_random_augment_without_transforms_is_identity():
    x = jnp.asarray(_images(n=5))
    out = random_augment(jax.random.key(0), x, rotation=0.0, width_shift=0.0, height_shift=0.0,
                         horizontal_flip=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_random_flip_only_mirrors_about_half():
    x = jnp.asarray(_images(n=200, h=4, w=5))
    out = np.asarray(random_augment(jax.random.key(2), x, rotation=0.0, width_shift=0.0, height_shift=0.0))
    same = np.all(out == np.asarray(x), axis=(1, 2, 3))
    mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)            # each image is itself or its exact mirror
    assert 70 <= mirrored.sum() <= 130        # Binomial(200, 0.5): mean 100, sd ~7


def test_random_shift_magnitudes_follow_fraction():
    # Image value = column index; a pure horizontal shift s gives out - col = -round(s) inside.
    n, w = 64, 20
    x = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, None, :, None], (n, 4, w, 1))
    out = np.asarray(random_augment(jax.random.key(3), x, rotation=0.0, width_shift=0.1,
                                    height_shift=0.0, horizontal_flip=False))
    offsets = out[:, 0, 5:15, 0] - np.arange(5, 15)
    assert np.all(offsets == offsets[:, :1])  # one integer shift per image
    shifts = -offsets[:, 0]
    assert np.abs(shifts).max() <= 2          # |s| <= 0.1 * 20 = 2 pixels
    assert set(np.unique(shifts)) == {-2, -1, 0, 1, 2}


@pytest.mark.parametrize("kwargs, error, words", [
    ({"rotation": -1.0}, ValueError, "rotation=-1.0"),
    ({"rotation": float("inf")}, ValueError, "rotation=inf"),
    ({"width_shift": 1.0}, ValueError, "width_shift=1.0"),
    ({"height_shift": -0.1}, ValueError, "height_shift=-0.1"),
    ({"horizontal_flip": "yes"}, TypeError, "horizontal_flip='yes'"),
    ({"interpolation": "cubic"}, ValueError, "nearest, bilinear"),
])
def test_random_augment_rejects_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        random_augment(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), **kwargs)


def test_images_must_be_float_rank4():
    with pytest.raises(TypeError, match="floating point.*uint8"):
        random_augment(jax.random.key(0), jnp.zeros((2, 4, 4, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"rank 4.*\(4, 4, 3\)"):
        random_augment(jax.random.key(0), jnp.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"angle_deg has shape \(3,\).*\(2,\)"):
        affine_transform(jnp.zeros((2, 4, 4, 3)), jnp.zeros(3), 0.0, 0.0, False)
