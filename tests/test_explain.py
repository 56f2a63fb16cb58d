"""Grad-CAM (``jaxcnn.explain``): the map falls where a hand-built model's evidence sits, it equals a
float64 NumPy computation of Selvaraju et al.'s formula, and each model's default layer is its last
conv block / stage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import explain
from jaxcnn.models import CifarCNN, Classifier, ResNet50, ResNetTiny


class ColourSpots(nn.Module):
    """``features``: channel 0 fires on red pixels, channel 1 on green ones (3x3 conv, ReLU, 2x2
    average pool: ``(N, H/2, W/2, 2)``); class 0's logit is channel 0's spatial mean, class 1's channel 1's."""

    @nn.compact
    def __call__(self, x, *, train):
        a = Features(name="features")(x)
        return nn.Dense(2, use_bias=False, name="head")(a.mean(axis=(1, 2)))  # (N, 2)


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="conv")(x))  # (N, H, W, 2)
        return nn.avg_pool(a, (2, 2), strides=(2, 2))  # (N, H/2, W/2, 2)


def colour_spots_variables():
    kernel = np.zeros((3, 3, 3, 2), np.float32)
    kernel[..., 0] = np.array([1.0, -1.0, -1.0]) / 9  # red minus green and blue, averaged over 3x3
    kernel[..., 1] = np.array([-1.0, 1.0, -1.0]) / 9
    return {"params": {"features": {"conv": {"kernel": jnp.asarray(kernel), "bias": jnp.full((2,), -0.1)}},
                       "head": {"kernel": jnp.eye(2)}}}


def spots_image(red_corner, green_corner, size=16, red_side=5, green_side=3):
    """A black uint8 image with a red square centred in one quadrant and a green one in another."""
    img = np.zeros((size, size, 3), np.uint8)
    for (row, col), side, channel in ((red_corner, red_side, 0), (green_corner, green_side, 1)):
        top, left = row * size // 2 + (size // 2 - side) // 2, col * size // 2 + (size // 2 - side) // 2
        img[top:top + side, left:left + side, channel] = 255
    return img


def quadrant(cam):
    i, j = np.unravel_index(np.argmax(cam), cam.shape)
    return int(i >= cam.shape[0] // 2), int(j >= cam.shape[1] // 2)


def test_the_map_peaks_in_the_quadrant_that_holds_the_class_evidence():
    model, variables = ColourSpots(), colour_spots_variables()
    images = np.stack([spots_image((0, 0), (1, 1)), spots_image((1, 0), (0, 1)), spots_image((0, 1), (1, 0))])
    red_quadrants = [(0, 0), (1, 0), (0, 1)]
    green_quadrants = [(1, 1), (0, 1), (1, 0)]
    predicted = explain.grad_cam(model, variables, images, layer="features", batch_size=2)  # red: the larger spot
    red = explain.grad_cam(model, variables, images, layer="features", class_index=0)
    green = explain.grad_cam(model, variables, images, layer="features", class_index=[1, 1, 1])
    # the predicted class's maps are class 0's; batches of 2 and of 3 may take other convolution kernels, whose
    # roundings differ on some CPUs (1.5e-8 on an AVX2 one): within a few float32 eps of the maps' maximum, 1
    np.testing.assert_allclose(predicted, red, rtol=0, atol=4 * np.finfo(np.float32).eps)
    for maps in (red, green):
        assert maps.shape == (3, 16, 16) and maps.dtype == np.float32
        assert maps.min() >= 0.0 and np.all(maps.max(axis=(1, 2)) == 1.0)
    assert [quadrant(m) for m in red] == red_quadrants
    assert [quadrant(m) for m in green] == green_quadrants
    for image, r, g in zip(images, red, green):  # each map is blind to the other class's spot
        assert g[image[..., 0] == 255].max() == 0 and r[image[..., 1] == 255].max() == 0


class LinearInFeatures(nn.Module):
    """``features``: a 2x2 stride-2 conv ``(N, H/2, W/2, 3)``; the logits: a dense layer over all of it."""

    @nn.compact
    def __call__(self, x, *, train):
        a = nn.Conv(3, (2, 2), strides=(2, 2), padding="VALID", name="features")(x)
        return nn.Dense(4, name="head")(a.reshape((a.shape[0], -1)))


def bilinear_up(m, size):
    """float64 ``(h, w) -> (size, size)`` bilinear with half-pixel centres, edges clamped."""
    def axis(n_in):
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo
    r0, r1, fr = axis(m.shape[0])
    c0, c1, fc = axis(m.shape[1])
    rows = m[r0] * (1 - fr)[:, None] + m[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def test_grad_cam_equals_a_float64_hand_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    k, b = rng.normal(size=(2, 2, 3, 3)), rng.normal(size=3) * 0.1
    w, c = rng.normal(size=(4 * 4 * 3, 4)), rng.normal(size=4)
    variables = {"params": {"features": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.asarray(b, jnp.float32)},
                            "head": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(c, jnp.float32)}}}
    x = images.astype(np.float64) / 255
    feats = np.zeros((3, 4, 4, 3))  # the 2x2 stride-2 conv by loops
    for i in range(4):
        for j in range(4):
            feats[:, i, j] = np.einsum("nabc,abcd->nd", x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2], k) + b
    logits = feats.reshape(3, -1) @ w + c

    def oracle(n, cls):
        alpha = w[:, cls].reshape(4, 4, 3).mean(axis=(0, 1))  # d logit / d feats is the dense column
        cam = bilinear_up(np.maximum(feats[n] @ alpha, 0), 8)
        return cam / cam.max() if cam.max() > 0 else cam  # no positive evidence: zeros

    got = explain.grad_cam(LinearInFeatures(), variables, images, layer="features")
    assert np.all(np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2] > 1e-3)  # a clear top class
    np.testing.assert_allclose(got, [oracle(n, logits[n].argmax()) for n in range(3)], atol=2e-6)
    got = explain.grad_cam(LinearInFeatures(), variables, images, layer="features", class_index=[3, 0, 2])
    want = [oracle(0, 3), oracle(1, 0), oracle(2, 2)]
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert [float(m.max()) for m in got] == [1.0, 1.0, 0.0]  # (class 2 has no positive evidence in image 2)


def test_the_default_layers_are_the_last_conv_block_and_the_last_stage():
    assert explain.default_layer(CifarCNN()) == "block3_bn2"
    assert explain.default_layer(CifarCNN(widths=(8, 16))) == "block2_bn2"
    assert explain.default_layer(ResNet50()) == "conv5_block3_out"
    tiny = Classifier(backbone=ResNetTiny(include_top=False, pooling="avg"), num_classes=3)
    assert explain.default_layer(tiny) == "backbone/conv5_block1_out"
    x = jnp.zeros((1, 32, 32, 3))
    for model in (CifarCNN(widths=(4, 8)), tiny):
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # noqa: B023
        layers = explain.feature_layers(model, variables, (32, 32, 3))
        assert layers[-1] == explain.default_layer(model)  # the last feature map before the head
    with pytest.raises(ValueError, match=r"no default layer for a ColourSpots; pass layer="):
        explain.default_layer(ColourSpots())


def test_bad_arguments_are_named():
    model, variables = ColourSpots(), colour_spots_variables()
    images = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"layer='head' outputs shape \(2, 2\); Grad-CAM needs a \(N, h, w, C\)"):
        explain.grad_cam(model, variables, images, layer="head")
    with pytest.raises(ValueError, match=r"layer='nope' is not a submodule of this ColourSpots; its feature maps: "
                                         r"features/conv, features$"):
        explain.grad_cam(model, variables, images, layer="nope")
    with pytest.raises(ValueError, match=r"class_index=2 outside \[0, 2\)"):
        explain.grad_cam(model, variables, images, layer="features", class_index=2)
    with pytest.raises(ValueError, match=r"class_index must be None, an int or \(2,\) ints"):
        explain.grad_cam(model, variables, images, layer="features", class_index=[0, 1, 1])
