"""Pictures: first-layer filter grids, activation grids, training curves, test results.

Everything draws on a bare :class:`matplotlib.figure.Figure` (no ``pyplot``, no screen,
no global figure state) and returns it; pass ``path=`` to also write a PNG. Figures are
written at exactly ``figsize * dpi`` pixels (no tight bounding box), so callers and tests
know the size in advance.

* :func:`plot_filters` — a conv kernel ``(kh, kw, C_in, C_out)`` HWIO as a grid of
  ``C_out`` panels: RGB when ``C_in == 3``, the channel mean in grey otherwise.
* :func:`plot_activations` — one image's feature maps ``(H, W, C)`` as a grid.
* :func:`plot_curves` — a run's history and summary: loss, accuracy, learning rate per epoch,
  best / early-stopping epoch marked (the end-of-run report, ``jaxcnn.report``, draws it
  into a run's ``plots/curves.png``).
* :func:`plot_histories` — several runs' curves on one figure (the dropout study).
* :func:`plot_confusion` — a confusion matrix of counts, annotated (rows true, columns predicted).
* :func:`plot_wrong` — a grid of misclassified images with their true and predicted labels.
* :func:`count_image_panels` — how many axes of a figure show an image.

It knows nothing of run folders (it imports nothing from jaxcnn): callers pass values.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_filters",
    "plot_activations",
    "plot_curves",
    "plot_histories",
    "plot_confusion",
    "plot_wrong",
    "count_image_panels",
    "save_figure",
]

History = Sequence[Mapping[str, Any]]
NORMALIZE = ("layer", "filter")


# ---------------------------------------------------------------------------- helpers


def save_figure(fig: Figure, path: Union[str, os.PathLike], *, dpi: int = 100,
                metadata: Optional[dict] = None) -> Path:
    """Write ``fig`` as a PNG at ``figsize * dpi`` pixels (parent folders are created).

    The file is written to ``<path>.tmp`` and renamed into place, so an interrupted
    save never leaves a half-written picture where a good one was. ``metadata``: PNG text
    chunks (``{key: str}``; Pillow reads them back in ``Image.open(path).info``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png", facecolor="white", metadata=metadata)
    os.replace(tmp, path)
    return path


def count_image_panels(fig: Figure) -> int:
    """Number of axes in ``fig`` that show an image (a filled panel of a grid)."""
    return sum(1 for ax in fig.axes if ax.images)


def _grid(n: int, ncols: int) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels at most ``ncols`` wide; never an empty row."""
    cols = min(ncols, n)
    return math.ceil(n / cols), cols


def _unit(a: np.ndarray, constant: float = 0.5) -> np.ndarray:
    """Scale ``a`` to [0, 1] by its own min/max; a constant array becomes ``constant``."""
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0.0:
        return np.full(a.shape, constant, dtype=np.float64)
    return (a - lo) / (hi - lo)


def _check_count(fn: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{fn}: {name}={value!r}; allowed: an int >= {minimum}")
    return int(value)


def _image_grid(
    fn: str, panels: list[np.ndarray], titles: list[str], *, ncols: int, panel_size: float, title: Optional[str],
    cmap: Optional[str],
) -> Figure:
    """Draw ``panels`` ((h, w, 3) RGB or (h, w) grey, values in [0, 1]) on a grid."""
    rows, cols = _grid(len(panels), ncols)
    fig = Figure(figsize=(cols * panel_size, rows * panel_size + (0.4 if title else 0.0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(panels):
            continue  # the last row's spare cells stay empty (no image)
        p = panels[i]
        if p.ndim == 3:
            ax.imshow(p, interpolation="nearest")
        else:
            ax.imshow(p, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------- filters


def plot_filters(
    kernel,
    *,
    ncols: int = 8,
    normalize: str = "layer",
    input_order: str = "RGB",
    max_filters: Optional[int] = None,
    title: Optional[str] = None,
    panel_size: float = 1.0,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """Draw a convolution kernel's filters as a grid, one panel per output channel.

    Args:
      kernel: ``(kh, kw, C_in, C_out)`` HWIO (NumPy or JAX array), e.g. a first conv layer
        ``(3, 3, 3, 32)`` or ResNet50's ``(7, 7, 3, 64)``.
      ncols: panels per row (the grid is ``ceil(n / ncols)`` rows; a last row that is not
        full stays partly empty; fewer filters than ``ncols`` give one row of ``n``).
      normalize: ``"layer"`` (default, as the seed): one min/max over the whole kernel maps
        weights to [0, 1], so panels are comparable; ``"filter"``: each panel uses its own
        min/max (more contrast, magnitudes no longer comparable).
      input_order: ``"RGB"`` (default) or ``"BGR"``: the colour order of the kernel's input
        channels when ``C_in == 3``. A model fed BGR images (Keras' caffe-preprocessed
        ResNet50) has BGR kernels; ``"BGR"`` flips them so panels show true colours.
      max_filters: draw only the first ``max_filters`` filters (default: all ``C_out``).
      title: figure title.
      panel_size: inches per panel.
      path: also write a PNG there (``panel_size * cols * dpi`` pixels wide).
      dpi: pixels per inch of the PNG.

    Panels are RGB (``(kh, kw, 3)``, input channels in R, G, B order) when ``C_in == 3``,
    otherwise the mean over input channels in grey. With ``normalize="layer"`` grey panels
    show the channel mean of the layer-normalised weights on a fixed [0, 1] scale; with
    ``"filter"`` the mean map is itself stretched to [0, 1]. Each panel is titled with the
    filter's index.

    Returns:
      The figure; ``count_image_panels(fig) == min(C_out, max_filters)``.
    """
    fn = "plot_filters"
    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"{fn}: kernel must be (kh, kw, C_in, C_out) HWIO, got shape {k.shape}")
    if not np.issubdtype(k.dtype, np.number) or k.size == 0:
        raise TypeError(f"{fn}: kernel must be a non-empty numeric array, got dtype {k.dtype} shape {k.shape}")
    k = k.astype(np.float64)
    if not np.all(np.isfinite(k)):
        raise ValueError(f"{fn}: kernel has NaN or inf entries")
    if normalize not in NORMALIZE:
        raise ValueError(f"{fn}: normalize={normalize!r}; allowed: {NORMALIZE}")
    if input_order not in ("RGB", "BGR"):
        raise ValueError(f"{fn}: input_order={input_order!r}; allowed: 'RGB', 'BGR'")
    ncols = _check_count(fn, "ncols", ncols)
    n = k.shape[3] if max_filters is None else min(_check_count(fn, "max_filters", max_filters), k.shape[3])
    rgb = k.shape[2] == 3
    if rgb and input_order == "BGR":
        k = k[:, :, ::-1, :]  # (kh, kw, [R, G, B], C_out)

    if normalize == "layer":
        k = _unit(k)  # one affine map for the whole layer
    panels = []
    for i in range(n):
        f = k[:, :, :, i]  # (kh, kw, C_in)
        p = f if rgb else f.mean(axis=2)  # (kh, kw, 3) or (kh, kw)
        panels.append(_unit(p) if normalize == "filter" else p)
    fig = _image_grid(fn, panels, [str(i) for i in range(n)], ncols=ncols, panel_size=panel_size, title=title,
                      cmap="gray")
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def map_kinds(activations) -> list[str]:
    """Each feature map of ``activations`` ``(H, W, C)`` as ``"dead"`` (all zero: a ReLU channel off
    for this image), ``"constant"`` (one non-zero value everywhere: it carries no spatial pattern,
    but it is not off) or ``"varying"``."""
    a = np.asarray(activations)
    if a.ndim != 3 or a.size == 0:
        raise ValueError(f"map_kinds: activations must be a non-empty (H, W, C) array, got shape {a.shape}")
    lows, highs = a.min(axis=(0, 1)), a.max(axis=(0, 1))  # (C,)
    return ["dead" if lo == hi == 0 else "constant" if lo == hi else "varying" for lo, hi in zip(lows, highs)]


#: How ``plot_activations`` draws a map that does not vary (colour-scale value; the panel title says which).
DEAD_SHADE, CONSTANT_SHADE = 0.0, 0.5


def plot_activations(
    activations,
    *,
    image=None,
    ncols: int = 8,
    max_maps: Optional[int] = None,
    title: Optional[str] = None,
    panel_size: float = 1.0,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """Draw one image's feature maps as a grid of panels, each scaled to its own range.

    A map that does not vary (``map_kinds``) has no range to scale: an all-zero ("dead") map is
    drawn at the bottom of the colour scale and titled ``"<c> dead"``; a constant non-zero map at
    the middle, titled ``"<c> =<value>"``, so the two are never confused.

    Args:
      activations: ``(H, W, C)`` or ``(1, H, W, C)`` NHWC, e.g. the output of the first conv
        layer (after ReLU) for one image.
      image: optional input image ``(H0, W0, 3)`` (uint8 0-255 or float, shown min/max
        scaled), drawn as the first panel titled ``"input"``.
      ncols, max_maps, title, panel_size, path, dpi: as in :func:`plot_filters`.

    Returns:
      The figure; ``count_image_panels(fig) == min(C, max_maps) + (image is not None)``.
    """
    fn = "plot_activations"
    a = np.asarray(activations)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{fn}: activations must be (H, W, C) or (1, H, W, C), got shape {np.shape(activations)}")
    if not np.issubdtype(a.dtype, np.number) or a.size == 0:
        raise TypeError(f"{fn}: activations must be a non-empty numeric array, got dtype {a.dtype}")
    ncols = _check_count(fn, "ncols", ncols)
    n = a.shape[2] if max_maps is None else min(_check_count(fn, "max_maps", max_maps), a.shape[2])
    panels, titles = [], []
    if image is not None:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] not in (1, 3):
            raise ValueError(f"{fn}: image must be (H, W, 3) or (H, W, 1), got shape {img.shape}")
        img = _unit(img.astype(np.float64))
        panels.append(img if img.shape[2] == 3 else img[:, :, 0])
        titles.append("input")
    a = a.astype(np.float64)
    kinds = map_kinds(a[:, :, :n])
    for c in range(n):
        if kinds[c] == "dead":
            panels.append(np.full(a.shape[:2], DEAD_SHADE))
            titles.append(f"{c} dead")
        elif kinds[c] == "constant":
            panels.append(np.full(a.shape[:2], CONSTANT_SHADE))
            titles.append(f"{c} ={a[0, 0, c]:.2g}")
        else:
            panels.append(_unit(a[:, :, c]))  # (H, W)
            titles.append(str(c))
    fig = _image_grid(fn, panels, titles, ncols=ncols, panel_size=panel_size, title=title, cmap="viridis")
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


# ---------------------------------------------------------------------------- curves


def _check_history(fn: str, history) -> list[dict]:
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence) or not history:
        raise ValueError(f"{fn}: history must be a non-empty list of per-epoch dicts, got {type(history).__name__}")
    for row in history:
        if not isinstance(row, Mapping) or "epoch" not in row:
            raise ValueError(f"{fn}: every history row must be a dict with an 'epoch' key, got {row!r}")
    return [dict(r) for r in history]


def _column(history: list[dict], key: str) -> Optional[np.ndarray]:
    """The column as floats (missing / None -> NaN), or None if no row has a number there."""
    vals = [r.get(key) for r in history]
    if all(v is None for v in vals):
        return None
    col = np.array([np.nan if v is None else float(v) for v in vals])
    return col if np.any(np.isfinite(col)) else None


def plot_curves(
    history: History,
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    summary: Optional[Mapping[str, Any]] = None,
    title: Optional[str] = None,
    dpi: int = 100,
    lr_schedule: str = "plateau",
) -> Figure:
    """Training curves of one run: loss, accuracy and learning rate per epoch.

    Args:
      history: the run's per-epoch rows (``history.json``: dicts with ``epoch`` and any of
        ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy``, ``lr``).
      path: where to write the PNG (None: nothing is written).
      summary: the run's summary, if any: ``best_epoch`` is marked with a dashed line, and
        ``stop_epoch`` with a dotted one when ``stopped_early``.
      title: figure title.
      dpi: the PNG is ``(9, 7.5)`` inches ``* dpi`` pixels.
      lr_schedule: the run's ``FitConfig.lr_schedule``: ``"plateau"`` draws the rate as steps
        (reduce-on-plateau's drops), ``"cosine"`` as a line through each epoch's last-step rate,
        labelled "learning rate (warm-up + cosine)".

    Three stacked panels share the epoch axis: loss (train, val), accuracy (train, val),
    and the learning rate on its own panel (log scale when it changes by more than 10x)
    so reduce-on-plateau drops show as steps.

    Returns:
      The figure.
    """
    history = _check_history("plot_curves", history)
    summary = dict(summary or {})
    epochs = np.array([float(r["epoch"]) for r in history])

    fig = Figure(figsize=(9, 7.5), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(3, 1, sharex=True, height_ratios=(2, 2, 1))
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split, style in (("train", "-"), ("val", "-")):
            col = _column(history, f"{split}_{metric}")
            if col is not None:
                ax.plot(epochs, col, style, marker="o", markersize=3, label=f"{split} {label}")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    lr = _column(history, "lr")
    if lr is not None:
        cosine = lr_schedule == "cosine"
        ax_lr.plot(epochs, lr, drawstyle="default" if cosine else "steps-post", color="tab:purple", marker="o",
                   markersize=3, label="learning rate (warm-up + cosine)" if cosine else "learning rate")
        pos = lr[np.isfinite(lr) & (lr > 0)]
        if pos.size and pos.max() / pos.min() > 10.0:
            ax_lr.set_yscale("log")
    else:
        ax_lr.text(0.5, 0.5, "no learning rate recorded", transform=ax_lr.transAxes, ha="center", va="center")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(True, alpha=0.3)

    best, stop = summary.get("best_epoch"), summary.get("stop_epoch")
    for ax in (ax_loss, ax_acc, ax_lr):
        if best is not None:
            ax.axvline(float(best), color="tab:green", linestyle="--", linewidth=1, label=f"best epoch {best}")
        if summary.get("stopped_early") and stop is not None:
            ax.axvline(float(stop), color="tab:red", linestyle=":", linewidth=1.5, label=f"early stop at epoch {stop}")
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if lr is not None and lr_schedule == "cosine":
        ax_lr.legend(fontsize=8, loc="best")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def plot_histories(
    histories: Mapping[str, History],
    *,
    path: Optional[Union[str, os.PathLike]] = None,
    title: Optional[str] = None,
    dpi: int = 100,
) -> Figure:
    """Several runs on one figure: accuracy (validation solid, training dashed, same colour
    per run, so the train-val gap is visible) and validation loss, per epoch.

    Args:
      histories: ``{label: history}`` (each a list of per-epoch dicts as in ``history.json``).
      path: also write a PNG there (``(12, 4.5)`` inches ``* dpi`` pixels).
      title: figure title.

    Returns:
      The figure; its first axes hold one solid validation-accuracy line per run, in order.
    """
    fn = "plot_histories"
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError(f"{fn}: histories must be a non-empty {{label: history}} mapping, got {histories!r}")
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for i, (label, hist) in enumerate(histories.items()):
        hist = _check_history(fn, hist)
        epochs = np.array([float(r["epoch"]) for r in hist])
        c = colors[i % len(colors)]
        for ax, key, style, text in (
            (ax_acc, "val_accuracy", "-", f"{label} (val)"),
            (ax_loss, "val_loss", "-", f"{label}"),
        ):
            col = _column(hist, key)
            if col is not None:
                ax.plot(epochs, col, style, color=c, marker="o", markersize=3, label=text)
    for i, (label, hist) in enumerate(histories.items()):  # dashed train lines after the solid ones
        col = _column(list(hist), "train_accuracy")
        if col is not None:
            epochs = np.array([float(r["epoch"]) for r in hist])
            ax_acc.plot(epochs, col, "--", color=colors[i % len(colors)], linewidth=1, alpha=0.7,
                        label=f"{label} (train)")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy: validation (solid), training (dashed)")
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="validation loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


# ---------------------------------------------------------------------------- test results


def plot_confusion(
    confusion,
    class_names: Sequence[str],
    *,
    title: Optional[str] = None,
    annotate: Optional[bool] = None,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """A confusion matrix: rows the true class, columns the predicted one, each cell's count written in it.

    Args:
      confusion: ``(K, K)`` non-negative integer counts (``[i, j]``: true ``i`` predicted ``j``).
      class_names: ``K`` names for the ticks.
      title: figure title (default: the accuracy, trace / sum, and the count).
      annotate: write the counts in the cells (default: when ``K <= 30``).
      path: also write a PNG there (about ``0.5 K + 2.5`` inches square ``* dpi`` pixels).

    A cell's colour is its share of its row (its true class), so the diagonal reads as each
    class's recall whatever the class sizes; the numbers are the counts.

    Returns:
      The figure (one axes with the matrix image, and its colour bar).
    """
    fn = "plot_confusion"
    c = np.asarray(confusion)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise ValueError(f"{fn}: confusion must be a square (K, K) matrix, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
        raise ValueError(f"{fn}: confusion must hold non-negative integer counts, got dtype {c.dtype}")
    k = c.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{fn}: {len(names)} class_names for a {k}x{k} matrix")
    annotate = k <= 30 if annotate is None else bool(annotate)
    total = int(c.sum())
    rows = c.sum(axis=1, keepdims=True)
    share = np.divide(c, rows, out=np.zeros(c.shape, np.float64), where=rows > 0)  # (K, K) row fractions

    side = 0.5 * k + 2.5
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if annotate:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    if title is None:
        title = f"accuracy {np.trace(c) / total:.4f} ({total} images)" if total else "no images"
    ax.set_title(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def plot_wrong(
    images,
    true,
    pred,
    prob,
    class_names: Sequence[str],
    *,
    ncols: int = 8,
    title: Optional[str] = None,
    panel_size: float = 1.6,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """A grid of misclassified images, each titled with its true and predicted class and the probability
    the model gave its prediction (pass them most confident first: ``jaxcnn.results.most_confidently_wrong``).

    Args:
      images: uint8 ``(n, H, W, 3)`` (or ``(n, H, W)`` greyscale), as in the dataset.
      true, pred: ``(n,)`` class indices; ``prob``: ``(n,)`` the predicted class's probability.
      class_names: the names, index = label.
      ncols, title, panel_size, path, dpi: as in :func:`plot_filters`.

    With ``n == 0`` the figure says that nothing was wrong.

    Returns:
      The figure; ``count_image_panels(fig) == n``.
    """
    fn = "plot_wrong"
    imgs = np.asarray(images)
    true, pred, prob = (np.asarray(a).reshape(-1) for a in (true, pred, prob))
    if imgs.ndim == 4 and imgs.shape[3] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[3] != 3):
        raise ValueError(f"{fn}: images must be (n, H, W, 3) or (n, H, W), got shape {imgs.shape}")
    n = imgs.shape[0]
    if not (len(true) == len(pred) == len(prob) == n):
        raise ValueError(f"{fn}: {n} images but {len(true)} true, {len(pred)} pred and {len(prob)} prob")
    names = [str(c) for c in class_names]
    for what, labels in (("true", true), ("pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"{fn}: {what} has labels outside [0, {len(names)})")
    ncols = _check_count(fn, "ncols", ncols)
    if n == 0:
        fig = Figure(figsize=(4, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no wrong predictions", ha="center", va="center", fontsize=11)
        if title:
            fig.suptitle(title, fontsize=10)
    else:
        panels = [(im.astype(np.float64) / 255.0) if imgs.dtype == np.uint8 else _unit(im.astype(np.float64))
                  for im in imgs]
        titles = [f"true: {names[t]}\npred: {names[p]} {q:.2f}" for t, p, q in zip(true, pred, prob)]
        if title:  # wrapped to the grid's width (about 11 characters per inch at this font size)
            title = textwrap.fill(title, width=max(16, int(_grid(n, ncols)[1] * panel_size * 11)))
        fig = _image_grid(fn, panels, titles, ncols=ncols, panel_size=panel_size, title=title, cmap="gray")
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def plot_reliability(
    table: Mapping[str, Any],
    *,
    after: Optional[Mapping[str, Any]] = None,
    title: Optional[str] = None,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """A reliability diagram: each confidence bin's accuracy against its mean confidence (the
    diagonal is perfect calibration), bars as wide as the bin, with the bins' counts below.

    Args:
      table: ``jaxcnn.metrics.reliability(probs, labels)`` (``edges``, ``count``, ``confidence``,
        ``accuracy``).
      after: the same table after temperature scaling, drawn as points over the bars.
      title: figure title.
      path: also write a PNG there (``(5, 6)`` inches ``* dpi`` pixels).
    """
    fn = "plot_reliability"
    for name, t in (("table", table), ("after", after)):
        if t is not None and not all(k in t for k in ("edges", "count", "confidence", "accuracy")):
            raise ValueError(f"{fn}: {name} must be jaxcnn.metrics.reliability's table "
                             f"(edges, count, confidence, accuracy)")
    edges = np.asarray(table["edges"], np.float64)
    width = np.diff(edges)
    fig = Figure(figsize=(5, 6), layout="constrained")
    ax, counts = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    acc = np.array([np.nan if a is None else a for a in table["accuracy"]])
    ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="tab:blue", alpha=0.7,
           edgecolor="black", linewidth=0.5, label="accuracy (raw softmax)")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    if after is not None:
        conf = np.array([np.nan if c is None else c for c in after["confidence"]])
        acc_after = np.array([np.nan if a is None else a for a in after["accuracy"]])
        ax.plot(conf, acc_after, "o", color="tab:orange", label="after temperature scaling")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in the bin")
    ax.legend(loc="upper left", fontsize=8)
    counts.bar(edges[:-1], np.asarray(table["count"]), width=width, align="edge", color="gray", edgecolor="black",
               linewidth=0.5)
    counts.set_xlabel("confidence (top-class probability)")
    counts.set_ylabel("examples")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


# ---------------------------------------------------------------------------- explanations


def plot_explanation(
    image,
    cam,
    top: Sequence[tuple[str, float]],
    *,
    explained: str,
    layer: Optional[str] = None,
    title: Optional[str] = None,
    alpha: float = 0.5,
    path: Optional[Union[str, os.PathLike]] = None,
    dpi: int = 100,
) -> Figure:
    """One image explained: the image, its Grad-CAM heat map laid over it, and the model's top classes.

    Args:
      image: uint8 ``(H, W, 3)`` (or ``(H, W)`` greyscale), as the model saw it.
      cam: ``(H, W)`` in [0, 1]: ``jaxcnn.explain.grad_cam``'s map of this image.
      top: ``[(class name, probability), ...]``, most likely first (drawn as bars, the explained
        class's in orange).
      explained: the class the map is for.
      layer: the feature map the map was computed on (written under the map).
      title: figure title (e.g. the file's name).
      alpha: the heat map's opacity over the image.
      path: also write a PNG there (``(11, 3.8)`` inches ``* dpi`` pixels).

    Returns:
      The figure: axes 0 the image, 1 the image with the map (its second image is ``cam``), 2 the
      bars (and the map's colour bar).
    """
    fn = "plot_explanation"
    img = np.asarray(image)
    heat = np.asarray(cam, np.float64)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"{fn}: image must be (H, W, 3) or (H, W), got shape {img.shape}")
    if heat.shape != img.shape[:2]:
        raise ValueError(f"{fn}: cam has shape {heat.shape}; expected the image's {img.shape[:2]}")
    if not top:
        raise ValueError(f"{fn}: top must list at least one (class name, probability)")
    pixels = img / 255.0 if img.dtype == np.uint8 else _unit(img.astype(np.float64))
    cmap = "gray" if img.ndim == 2 else None

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_img, ax_cam, ax_bar = fig.subplots(1, 3, width_ratios=(1, 1, 1.3))
    ax_img.imshow(pixels, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax_img.set_title("image", fontsize=10)
    ax_cam.imshow(pixels, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    shown = ax_cam.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
    ax_cam.set_title(f"Grad-CAM: {explained}", fontsize=10)
    if layer:
        ax_cam.set_xlabel(f"on {layer}", fontsize=8)
    for ax in (ax_img, ax_cam):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=ax_cam, shrink=0.8, label="evidence (1 = strongest)")

    names = [str(n) for n, _ in top]
    probs = np.array([float(p) for _, p in top])
    rows = np.arange(len(names))
    ax_bar.barh(rows, probs, color=["tab:orange" if n == explained else "tab:blue" for n in names])
    for r, p in zip(rows, probs):
        ax_bar.text(min(p, 1.0) + 0.01, r, f"{p:.3f}", va="center", fontsize=8)
    ax_bar.set_yticks(rows, names, fontsize=9)
    ax_bar.invert_yaxis()  # most likely on top
    ax_bar.set_xlim(0, 1.15)
    ax_bar.set_xlabel("probability")
    ax_bar.set_title(f"top {len(names)} classes", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig
