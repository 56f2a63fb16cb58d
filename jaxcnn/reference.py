"""Plain NumPy reference implementations: the seed's loops and their backward passes.

These are deliberately slow, explicit loops — one output element at a time, exactly as
the seed answers questions 1–3 — so that they are easy to check by eye. They exist to
test :mod:`jaxcnn.layers` (values and gradients) and to benchmark against; nothing in
the library calls them. The seed's Keras CIFAR CNN (question 4) is here too
(:func:`seed_keras_cifar_cnn`), the reference for ``CifarCNN`` in tests and benchmarks.
For the models' shapes, where the loops would take minutes, the convolution comes vectorised
too (:func:`conv2d_forward_by_taps`, :func:`conv2d_backward_by_taps`, tested against the loops):
in float64 these are the oracles the tests hold float32 results to.

Layouts are those of :mod:`jaxcnn.layers`: ``X`` is ``(N, H, W, C_in)`` and ``W`` is
``(kh, kw, C_in, C_out)``. Paddings here are always explicit per-side pairs
``((top, bottom), (left, right))``; use :func:`jaxcnn.layers.resolve_padding` to turn
``"SAME"`` and friends into that form.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def _out_size(size: int, k_eff: int, stride: int, lo: int, hi: int) -> int:
    return (size + lo + hi - k_eff) // stride + 1


def conv2d_forward(
    X: np.ndarray,
    W: np.ndarray,
    b: Optional[np.ndarray] = None,
    stride: Tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: Tuple[int, int] = (1, 1),
):
    """Convolution forward pass, one output element at a time.

    Returns ``(out, cache)`` with ``out`` of shape ``(N, H_out, W_out, C_out)`` and the
    cache needed by :func:`conv2d_backward`.
    """
    N, H, Wd, C_in = X.shape
    kh, kw, _, C_out = W.shape
    (sh, sw), (dh, dw) = stride, dilation
    (pt, pb), (pl, pr) = padding
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant")
    keh, kew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    H_out = _out_size(H, keh, sh, pt, pb)
    W_out = _out_size(Wd, kew, sw, pl, pr)
    out = np.zeros((N, H_out, W_out, C_out), dtype=np.result_type(X, W))
    for n in range(N):
        for c_out in range(C_out):
            for h in range(H_out):
                for w in range(W_out):
                    h0, w0 = h * sh, w * sw
                    # (kh, kw, C_in): the input region the kernel sees, every dh-th / dw-th pixel.
                    region = X_pad[n, h0 : h0 + keh : dh, w0 : w0 + kew : dw, :]
                    out[n, h, w, c_out] = np.sum(region * W[:, :, :, c_out])
                    if b is not None:
                        out[n, h, w, c_out] += b[c_out]
    cache = (X, W, b, stride, padding, dilation)
    return out, cache


def conv2d_backward(dout: np.ndarray, cache):
    """Convolution backward pass: ``(dX, dW, db)`` for upstream gradient ``dout``.

    Every output element ``out[n, h, w, c]`` was ``sum(region * W[..., c]) + b[c]``, so it
    sends ``dout[n, h, w, c] * W[..., c]`` back to its region of the padded input,
    ``dout[n, h, w, c] * region`` to ``W[..., c]`` and ``dout[n, h, w, c]`` to ``b[c]``.
    """
    X, W, b, (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = cache
    N, H, Wd, _ = X.shape
    kh, kw, _, C_out = W.shape
    keh, kew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant")
    dX_pad = np.zeros_like(X_pad, dtype=dout.dtype)
    dW = np.zeros_like(W, dtype=dout.dtype)
    _, H_out, W_out, _ = dout.shape
    for n in range(N):
        for c_out in range(C_out):
            for h in range(H_out):
                for w in range(W_out):
                    h0, w0 = h * sh, w * sw
                    g = dout[n, h, w, c_out]
                    region = X_pad[n, h0 : h0 + keh : dh, w0 : w0 + kew : dw, :]
                    dW[:, :, :, c_out] += g * region
                    dX_pad[n, h0 : h0 + keh : dh, w0 : w0 + kew : dw, :] += g * W[:, :, :, c_out]
    dX = dX_pad[:, pt : pt + H, pl : pl + Wd, :]
    db = None if b is None else dout.sum(axis=(0, 1, 2))
    return dX, dW, db


def _tap_slices(X_pad, out_hw, i, j, stride, dilation):
    """The input pixels kernel tap ``(i, j)`` meets, one per output pixel: ``(N, H_out, W_out, C_in)``."""
    (H_out, W_out), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return X_pad[:, i * dh : i * dh + (H_out - 1) * sh + 1 : sh, j * dw : j * dw + (W_out - 1) * sw + 1 : sw, :]


def conv2d_forward_by_taps(
    X: np.ndarray,
    W: np.ndarray,
    b: Optional[np.ndarray] = None,
    stride: Tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: Tuple[int, int] = (1, 1),
):
    """The convolution of :func:`conv2d_forward`, vectorised for the shapes where the loops take
    minutes: one matrix product per kernel tap ``(i, j)``, the input pixels that tap meets
    ``(N * H_out * W_out, C_in)`` times ``W[i, j]``. In float64 it is the float64 oracle of the
    tests at the models' shapes; it equals the loops up to float64 rounding (tested).

    Returns ``(out, cache)`` like :func:`conv2d_forward`.
    """
    N, H, Wd, C_in = X.shape
    kh, kw, _, C_out = W.shape
    (sh, sw), (dh, dw) = stride, dilation
    (pt, pb), (pl, pr) = padding
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant")
    H_out = _out_size(H, (kh - 1) * dh + 1, sh, pt, pb)
    W_out = _out_size(Wd, (kw - 1) * dw + 1, sw, pl, pr)
    out = np.zeros((N * H_out * W_out, C_out), dtype=np.result_type(X, W))
    for i in range(kh):
        for j in range(kw):
            out += _tap_slices(X_pad, (H_out, W_out), i, j, stride, dilation).reshape(-1, C_in) @ W[i, j]
    out = out.reshape(N, H_out, W_out, C_out)
    if b is not None:
        out = out + b
    return out, (X, W, b, stride, padding, dilation)


def conv2d_backward_by_taps(dout: np.ndarray, cache):
    """:func:`conv2d_backward`, vectorised like :func:`conv2d_forward_by_taps`: for each kernel tap
    ``(i, j)``, ``dW[i, j]`` is the tap's input pixels transposed times ``dout`` (a sum over the
    batch and the output pixels) and the tap sends ``dout @ W[i, j]^T`` back to those pixels."""
    X, W, b, stride, ((pt, pb), (pl, pr)), dilation = cache
    N, H, Wd, C_in = X.shape
    kh, kw, _, C_out = W.shape
    _, H_out, W_out, _ = dout.shape
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant")
    dX_pad = np.zeros(X_pad.shape, dtype=np.result_type(dout, W))
    dW = np.zeros(W.shape, dtype=np.result_type(dout, X))
    g = dout.reshape(-1, C_out)
    for i in range(kh):
        for j in range(kw):
            dW[i, j] = _tap_slices(X_pad, (H_out, W_out), i, j, stride, dilation).reshape(-1, C_in).T @ g
            # a view into dX_pad: taps that meet the same pixel add up there
            _tap_slices(dX_pad, (H_out, W_out), i, j, stride, dilation)[...] += (g @ W[i, j].T).reshape(
                N, H_out, W_out, C_in)
    dX = dX_pad[:, pt : pt + H, pl : pl + Wd, :]
    db = None if b is None else dout.sum(axis=(0, 1, 2))
    return dX, dW, db


def max_pool2d_forward(
    X: np.ndarray,
    pool_size: Tuple[int, int] = (2, 2),
    stride: Tuple[int, int] = (2, 2),
    padding: Pads = ((0, 0), (0, 0)),
):
    """Max pooling forward pass (padding holds ``-inf``). Returns ``(out, cache)``."""
    N, H, Wd, C = X.shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = pool_size, stride, padding
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant", constant_values=-np.inf)
    H_out = _out_size(H, kh, sh, pt, pb)
    W_out = _out_size(Wd, kw, sw, pl, pr)
    out = np.zeros((N, H_out, W_out, C), dtype=X.dtype)
    for n in range(N):
        for c in range(C):
            for h in range(H_out):
                for w in range(W_out):
                    window = X_pad[n, h * sh : h * sh + kh, w * sw : w * sw + kw, c]
                    out[n, h, w, c] = np.max(window)
    cache = (X, pool_size, stride, padding)
    return out, cache


def max_pool2d_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Max pooling backward pass: each window's gradient goes to its arg-max (first on ties)."""
    X, (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = cache
    N, H, Wd, C = X.shape
    X_pad = np.pad(X, ((0, 0), (pt, pb), (pl, pr), (0, 0)), mode="constant", constant_values=-np.inf)
    dX_pad = np.zeros(X_pad.shape, dtype=dout.dtype)
    _, H_out, W_out, _ = dout.shape
    for n in range(N):
        for c in range(C):
            for h in range(H_out):
                for w in range(W_out):
                    window = X_pad[n, h * sh : h * sh + kh, w * sw : w * sw + kw, c]
                    i, j = np.unravel_index(np.argmax(window), window.shape)
                    dX_pad[n, h * sh + i, w * sw + j, c] += dout[n, h, w, c]
    return dX_pad[:, pt : pt + H, pl : pl + Wd, :]


def avg_pool2d_forward(
    X: np.ndarray,
    pool_size: Tuple[int, int] = (2, 2),
    stride: Tuple[int, int] = (2, 2),
    padding: Pads = ((0, 0), (0, 0)),
) -> np.ndarray:
    """Average pooling forward pass; padded positions are left out of each average."""
    N, H, Wd, C = X.shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = pool_size, stride, padding
    H_out = _out_size(H, kh, sh, pt, pb)
    W_out = _out_size(Wd, kw, sw, pl, pr)
    out = np.zeros((N, H_out, W_out, C), dtype=X.dtype)
    for h in range(H_out):
        for w in range(W_out):
            # Window bounds in unpadded coordinates, clipped to the real input.
            top, left = h * sh - pt, w * sw - pl
            rows = slice(max(top, 0), min(top + kh, H))
            cols = slice(max(left, 0), min(left + kw, Wd))
            out[:, h, w, :] = X[:, rows, cols, :].mean(axis=(1, 2))
    return out


def dropout_forward(x: np.ndarray, p: float = 0.5, training: bool = True, rng: Optional[np.random.Generator] = None):
    """Inverted dropout forward pass (the seed's ``dropout_forward``), ``p`` = drop probability.

    Returns ``(out, mask)``; ``mask`` already holds the ``1 / (1 - p)`` scale (``None`` at inference).
    """
    if not training:
        return x, None
    rng = np.random.default_rng() if rng is None else rng
    mask = rng.binomial(1, 1 - p, size=x.shape) / (1 - p)
    return x * mask, mask


def dropout_backward(dout: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Inverted dropout backward pass: the upstream gradient times the (scaled) mask."""
    return dout * mask


def seed_keras_cifar_cnn(classifier_activation="softmax"):
    """Question 4's model, exactly as the seed writes it (Keras 3, whatever ``KERAS_BACKEND`` is):
    the reference for :class:`jaxcnn.models.CifarCNN` in the tests and the benchmarks.

    ``classifier_activation=None`` gives the same model with logits out (the seed's last Dense
    without its softmax)."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(32, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Conv2D(64, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(64, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Conv2D(128, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.Conv2D(128, (3, 3), activation="relu", padding="same"),
        layers.BatchNormalization(),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.BatchNormalization(),
        layers.Dropout(0.5),
        layers.Dense(10, activation=classifier_activation),
    ])
