"""The embedded offline dataset: procedural shapes and textures, generated from a seed.

Machines without network (CI, air-gapped users) still run every experiment end to end
on this set. It has CIFAR-10's shapes and dtypes (uint8 ``(N, 32, 32, 3)``, int32
labels, 10 classes) and is never used in place of CIFAR-10 unless asked for by name
(``load_dataset("offline")`` / ``--dataset offline``).

Each image is one object on a cluttered background:

* background: two random colours blended by a random low-frequency wave field;
* object: one of ten classes, six shapes (disk, ring, square, triangle, plus,
  crescent) and four textures inside a disk-shaped patch (horizontal stripes,
  vertical stripes, checkerboard, dots), in a random colour that contrasts with the
  background, at a random position and scale (radius 18-32 % of the image side),
  with a small random tilt (±10°; the crescent and the disk-like classes at any
  angle);
* clutter: up to three small distractor blobs, then Gaussian pixel noise.

The classes are chosen so that the augmentations of the seed's CIFAR-10 experiment
(horizontal flip, rotation ±15°, shifts of 10 %) keep every label valid: every
class is either mirror-symmetric about the vertical axis or appears at all
angles, and the only orientation pair (horizontal / vertical stripes) is 90°
apart. The texture classes share the disk's outline, so a model must look inside
the object. How hard it is (nearest-class-mean baselines, the seed's Keras CNN on it) and how
long it takes to generate, measured: ``experiments/cifar10/README.md``.
"""

from __future__ import annotations

import numpy as np

from jaxcnn.data.core import Dataset, Split

CLASS_NAMES = (
    "disk", "ring", "square", "triangle", "plus", "crescent",
    "horizontal_stripes", "vertical_stripes", "checkerboard", "dots",
)
# Classes whose look does not depend on the tilt get any angle; the others ±10°.
_ANY_ANGLE = {"disk", "ring", "crescent", "dots"}
_MAX_TILT = np.deg2rad(10.0)


def make_offline_dataset(*, num_train: int = 10000, num_val: int = 2000, num_test: int = 2000,
                         image_size: int = 32, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Generates the embedded offline dataset (its generation time: ``experiments/cifar10/README.md``).

    Args:
      num_train, num_val, num_test: examples per split (each >= 1). Every split is
        class-balanced (class counts differ by at most one) and shuffled.
      image_size: side of the square images, >= 16 (default 32, as CIFAR-10).
      num_classes: 2..10; uses the first ``num_classes`` of :data:`CLASS_NAMES`.
      seed: int >= 0. The same arguments give bitwise the same arrays; each split
        has its own random stream, so e.g. ``num_train`` does not change the test set.

    Returns:
      A :class:`Dataset` named ``"offline"``: uint8 images ``(N, image_size, image_size, 3)``,
      int32 labels ``(N,)``, ``class_names`` a prefix of :data:`CLASS_NAMES`.
    """
    for arg, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_offline_dataset: {arg}={value!r}; must be an int >= 1")
    if not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"make_offline_dataset: image_size={image_size!r}; must be an int >= 16")
    if not isinstance(num_classes, (int, np.integer)) or not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(
            f"make_offline_dataset: num_classes={num_classes!r}; must be an int in 2..{len(CLASS_NAMES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_offline_dataset: seed={seed!r}; must be an int >= 0")

    streams = np.random.SeedSequence([int(seed), 0x0FF1]).spawn(3)
    splits = [
        _make_split(np.random.default_rng(stream), n, int(image_size), int(num_classes))
        for stream, n in zip(streams, (num_train, num_val, num_test))
    ]
    return Dataset(name="offline", train=splits[0], val=splits[1], test=splits[2],
                   num_classes=int(num_classes), class_names=CLASS_NAMES[:num_classes])


def _make_split(rng: np.random.Generator, n: int, size: int, num_classes: int) -> Split:
    """``n`` balanced, shuffled examples: uint8 ``(n, size, size, 3)``, int32 ``(n,)``."""
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    # Pixel-centre coordinates, (1, size, size); y grows downwards.
    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = coords[None, :, None], coords[None, None, :]

    bg = _background(rng, n, size, ys, xs)                           # (n, H, W, 3)
    fg_colour = _contrasting_colours(rng, bg.mean(axis=(1, 2)))      # (n, 3)

    # Object pose: centre, radius (pixels), tilt (radians).
    cx = rng.uniform(0.3, 0.7, n).astype(np.float32) * size
    cy = rng.uniform(0.3, 0.7, n).astype(np.float32) * size
    radius = rng.uniform(0.18, 0.32, n).astype(np.float32) * size
    tilt = rng.uniform(-_MAX_TILT, _MAX_TILT, n).astype(np.float32)
    any_angle = np.isin(labels, [CLASS_NAMES.index(c) for c in _ANY_ANGLE])
    tilt = np.where(any_angle, rng.uniform(-np.pi, np.pi, n).astype(np.float32), tilt)
    period = rng.uniform(4.0, 7.0, n).astype(np.float32)            # texture period, pixels

    mask = np.zeros((n, size, size), np.float32)                     # (n, H, W) coverage 0..1
    for c in range(num_classes):
        idx = np.nonzero(labels == c)[0]
        if idx.size == 0:
            continue
        # Object-frame coordinates in units of the radius, (k, H, W).
        dx, dy = xs - cx[idx, None, None], ys - cy[idx, None, None]
        cos, sin = np.cos(tilt[idx])[:, None, None], np.sin(tilt[idx])[:, None, None]
        r = radius[idx, None, None]
        u, v = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r
        mask[idx] = _class_mask(CLASS_NAMES[c], u, v, r, period[idx, None, None])

    img = bg                                                         # (n, H, W, 3), in place from here
    img += mask[..., None] * (fg_colour[:, None, None, :] - img)
    _add_distractors(rng, img, ys, xs)
    noise_scale = rng.uniform(0.02, 0.08, (n, 1, 1, 1)).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise_scale
    img *= 255.0
    images = np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8)
    return Split(images=images, labels=labels)


def _background(rng, n, size, ys, xs):
    """Two random colours blended by a low-frequency wave field: float32 ``(n, H, W, 3)``."""
    c0 = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    c1 = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    field = np.zeros((n, size, size), np.float32)
    for _ in range(3):  # sum of three plane waves, period 1-3 image sides
        angle = rng.uniform(0.0, np.pi, n).astype(np.float32)[:, None, None]
        freq = (2 * np.pi / (rng.uniform(1.0, 3.0, n) * size)).astype(np.float32)[:, None, None]
        phase = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)[:, None, None]
        field += np.sin(freq * (np.cos(angle) * xs + np.sin(angle) * ys) + phase)
    weight = (0.5 + field / 6.0)[..., None]                          # in [0, 1]
    return c0[:, None, None, :] + weight * (c1 - c0)[:, None, None, :]


def _contrasting_colours(rng, bg_mean):
    """Random colours at least 0.45 (RGB distance) from ``bg_mean`` ``(n, 3)``."""
    fg = rng.uniform(0.0, 1.0, bg_mean.shape).astype(np.float32)
    far = np.linalg.norm(fg - bg_mean, axis=1, keepdims=True) >= 0.45
    return np.where(far, fg, 1.0 - bg_mean).astype(np.float32)


def _soft(sdf_pixels):
    """Anti-aliased coverage of a region with signed distance ``sdf_pixels`` (< 0 inside)."""
    return np.clip(0.5 - sdf_pixels, 0.0, 1.0)


def _class_mask(name, u, v, r, period):
    """Coverage ``(k, H, W)`` of class ``name`` in object coordinates ``u, v`` (radius units)."""
    rho = np.sqrt(u * u + v * v)
    if name == "disk":
        return _soft((rho - 1.0) * r)
    if name == "ring":
        return _soft((np.abs(rho - 0.75) - 0.25) * r)
    if name == "square":
        return _soft((np.maximum(np.abs(u), np.abs(v)) - 0.85) * r)
    if name == "triangle":  # apex up (v < 0), mirror-symmetric about the vertical axis
        d = np.maximum(v, np.maximum(0.866 * u - 0.5 * v, -0.866 * u - 0.5 * v)) - 0.5
        return _soft(d * r * 1.3)
    if name == "plus":
        bar_h = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3)
        bar_v = np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0)
        return _soft(np.minimum(bar_h, bar_v) * r)
    if name == "crescent":
        bite = np.sqrt((u - 0.55) ** 2 + v * v) - 0.8
        return _soft(np.maximum(rho - 1.0, -bite) * r)
    # Textures: drawn inside a disk, so the outline says nothing about the class.
    window = _soft((rho - 1.0) * r)
    phase_u, phase_v = 2 * np.pi * u * r / period, 2 * np.pi * v * r / period
    if name == "horizontal_stripes":
        pattern = np.sin(phase_v)
    elif name == "vertical_stripes":
        pattern = np.sin(phase_u)
    elif name == "checkerboard":
        pattern = 2.0 * np.sin(phase_u) * np.sin(phase_v)
    elif name == "dots":
        pattern = np.cos(phase_u) + np.cos(phase_v) - 1.0
    else:
        raise ValueError(f"unknown offline class {name!r}")
    return window * np.clip(0.5 + 1.5 * pattern, 0.0, 1.0)


def _add_distractors(rng, img, ys, xs):
    """Paints 0-3 small blobs (radius 1-2.5 px) of random colour on each image, in place."""
    n, size = img.shape[0], img.shape[1]
    for _ in range(3):
        present = rng.uniform(0.0, 1.0, n) < 0.5
        cx = rng.uniform(0.0, size, n).astype(np.float32)[:, None, None]
        cy = rng.uniform(0.0, size, n).astype(np.float32)[:, None, None]
        rad = rng.uniform(1.0, 2.5, n).astype(np.float32)[:, None, None]
        colour = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
        cover = _soft(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - rad) * present[:, None, None]
        img += cover[..., None] * (colour[:, None, None, :] - img)
