"""jaxcnn.viz: filter / activation grids and training curves.

Panels hold exactly the normalised weights the docstring promises (checked against NumPy),
the grid has one image per filter for any count, PNGs have the promised pixel size and are
not blank, and the curves carry the history's values and the early-stopping marks.
"""


import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxcnn import viz

VAR_FLOOR = 1e-4  # a blank (single-colour) PNG has variance 0


def read_png(path):
    img = mpimg.imread(str(path))  # (H, W, 4) float in [0, 1]
    return img[..., :3]


def panel_arrays(fig):
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]


def test_filters_rgb_layer_normalised_like_the_seed():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 3, 32))  # the CIFAR CNN's first layer
    fig = viz.plot_filters(k)
    assert viz.count_image_panels(fig) == 32
    want = (k - k.min()) / (k.max() - k.min())  # the seed's whole-layer normalisation
    for i, p in enumerate(panel_arrays(fig)):
        np.testing.assert_allclose(p, want[:, :, :, i], rtol=0, atol=1e-12)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [str(i) for i in range(32)]


def test_bgr_kernel_is_shown_in_rgb_order():
    k = np.random.default_rng(5).normal(size=(7, 7, 3, 4))  # a caffe-style (BGR input) kernel
    panels = panel_arrays(viz.plot_filters(k, input_order="BGR"))
    want = (k - k.min()) / (k.max() - k.min())
    np.testing.assert_allclose(panels[2][:, :, 0], want[:, :, 2, 2], atol=1e-12)  # red panel channel = B-G-R's R
    np.testing.assert_allclose(panels[2][:, :, 2], want[:, :, 0, 2], atol=1e-12)


def test_filters_grey_channel_mean_and_per_filter_option():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(5, 5, 4, 6))  # C_in != 3 -> grey mean over input channels
    fig = viz.plot_filters(k, normalize="layer")
    want = ((k - k.min()) / (k.max() - k.min())).mean(axis=2)
    got = panel_arrays(fig)
    assert len(got) == 6
    for i, p in enumerate(got):
        np.testing.assert_allclose(p, want[:, :, i], atol=1e-12)
        assert fig.axes[i].images[0].get_cmap().name == "gray"

    fig = viz.plot_filters(k, normalize="filter")
    for i, p in enumerate(panel_arrays(fig)):
        m = k[:, :, :, i].mean(axis=2)
        np.testing.assert_allclose(p, (m - m.min()) / (m.max() - m.min()), atol=1e-12)
        assert p.min() == 0.0 and p.max() == 1.0


def test_filters_constant_filter_is_mid_grey_not_nan():
    k = np.zeros((3, 3, 3, 2))
    k[..., 1] = np.arange(27).reshape(3, 3, 3)
    panels = panel_arrays(viz.plot_filters(k, normalize="filter"))
    np.testing.assert_array_equal(panels[0], np.full((3, 3, 3), 0.5))
    assert np.isfinite(panels[1]).all()


@pytest.mark.parametrize("c_out, ncols, rows, cols", [(32, 8, 4, 8), (64, 8, 8, 8), (10, 8, 2, 8), (1, 8, 1, 1),
                                                      (3, 8, 1, 3), (7, 3, 3, 3)])
def test_filter_grid_adapts_to_any_count(c_out, ncols, rows, cols):
    k = np.random.default_rng(c_out).normal(size=(3, 3, 3, c_out))
    fig = viz.plot_filters(k, ncols=ncols)
    assert viz.count_image_panels(fig) == c_out
    assert len(fig.axes) == rows * cols  # spare cells of the last row exist but stay empty
    gs = fig.axes[0].get_subplotspec().get_gridspec()
    assert (gs.nrows, gs.ncols) == (rows, cols)


def test_max_filters_keeps_the_first_ones():
    k = np.random.default_rng(2).normal(size=(7, 7, 3, 64))
    fig = viz.plot_filters(k, max_filters=20)
    assert viz.count_image_panels(fig) == 20
    want = (k - k.min()) / (k.max() - k.min())
    np.testing.assert_allclose(panel_arrays(fig)[19], want[:, :, :, 19], atol=1e-12)


def test_filter_png_size_and_not_blank(tmp_path):
    k = np.random.default_rng(3).normal(size=(3, 3, 3, 32))
    path = tmp_path / "sub" / "filters.png"
    viz.plot_filters(k, path=path, panel_size=1.0, dpi=50, title="t")
    img = read_png(path)
    assert img.shape == (int(round((4 * 1.0 + 0.4) * 50)), 8 * 50, 3)  # rows*panel + title, cols*panel
    assert img.var() > VAR_FLOOR
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(kernel=np.zeros((3, 3, 3))), ValueError, "HWIO"),
        (dict(kernel=np.zeros((3, 3, 3, 4)), normalize="global"), ValueError, "normalize='global'"),
        (dict(kernel=np.zeros((3, 3, 3, 4)), ncols=0), ValueError, "ncols=0"),
        (dict(kernel=np.zeros((3, 3, 3, 4)), input_order="rgb"), ValueError, "input_order='rgb'"),
        (dict(kernel=np.zeros((3, 3, 3, 4)), max_filters=0), ValueError, "max_filters=0"),
        (dict(kernel=np.full((3, 3, 3, 4), np.nan)), ValueError, "NaN"),
        (dict(kernel=np.array(["a"] * 4).reshape(1, 1, 1, 4)), TypeError, "numeric"),
    ],
)
def test_filter_errors_name_the_argument(kwargs, exc, words):
    kernel = kwargs.pop("kernel")
    with pytest.raises(exc, match=words):
        viz.plot_filters(kernel, **kwargs)


def test_activations_grid_with_input(tmp_path):
    rng = np.random.default_rng(4)
    acts = rng.normal(size=(1, 16, 16, 10))
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    fig = viz.plot_activations(acts, image=image, ncols=4, path=tmp_path / "a.png", dpi=40)
    assert viz.count_image_panels(fig) == 11
    panels = panel_arrays(fig)
    np.testing.assert_allclose(panels[0], (image - image.min()) / float(image.max() - image.min()))
    a = acts[0, :, :, 9]
    np.testing.assert_allclose(panels[10], (a - a.min()) / (a.max() - a.min()))
    img = read_png(tmp_path / "a.png")
    assert img.shape == (3 * 40, 4 * 40, 3)
    assert img.var() > VAR_FLOOR
    with pytest.raises(ValueError, match="activations"):
        viz.plot_activations(np.zeros((2, 4, 4, 3)))
    dead = viz.plot_activations(np.zeros((4, 4, 2)))  # all-zero (dead ReLU) maps: bottom of the scale
    np.testing.assert_array_equal(panel_arrays(dead)[1], np.zeros((4, 4)))


HISTORY = [
    {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.30, "val_loss": 1.9, "val_accuracy": 0.35, "lr": 1e-3},
    {"epoch": 2, "train_loss": 1.5, "train_accuracy": 0.50, "val_loss": 1.6, "val_accuracy": 0.45, "lr": 1e-3},
    {"epoch": 3, "train_loss": 1.2, "train_accuracy": 0.60, "val_loss": 1.5, "val_accuracy": 0.50, "lr": 1e-3},
    {"epoch": 4, "train_loss": 1.0, "train_accuracy": 0.70, "val_loss": 1.55, "val_accuracy": 0.49, "lr": 2e-4},
    {"epoch": 5, "train_loss": 0.8, "train_accuracy": 0.75, "val_loss": 1.58, "val_accuracy": 0.51, "lr": 4e-5},
]
SUMMARY = {"best_epoch": 3, "stopped_early": True, "stop_epoch": 5, "dataset": "offline", "best_val_loss": 1.5}


def lines_by_label(ax):
    return {ln.get_label(): ln for ln in ax.lines}


def test_curves_of_a_history_and_summary_write_the_png(tmp_path):
    out = tmp_path / "plots" / "curves.png"
    fig = viz.plot_curves(HISTORY, out, summary=SUMMARY, title="run (offline)")  # as the end-of-run report calls it
    img = read_png(out)
    assert img.shape == (750, 900, 3)
    assert img.var() > VAR_FLOOR

    ax_loss, ax_acc, ax_lr = fig.axes
    loss = lines_by_label(ax_loss)
    np.testing.assert_allclose(loss["train loss"].get_ydata(), [r["train_loss"] for r in HISTORY])
    np.testing.assert_allclose(loss["val loss"].get_ydata(), [r["val_loss"] for r in HISTORY])
    acc = lines_by_label(ax_acc)
    np.testing.assert_allclose(acc["val accuracy"].get_ydata(), [r["val_accuracy"] for r in HISTORY])
    np.testing.assert_allclose(acc["train accuracy"].get_xdata(), [1, 2, 3, 4, 5])
    lr = lines_by_label(ax_lr)
    np.testing.assert_allclose(lr["learning rate"].get_ydata(), [r["lr"] for r in HISTORY])
    assert ax_lr.get_yscale() == "log"  # 1e-3 -> 4e-5: a 25x drop
    for ax in fig.axes:  # best and early-stop epochs marked on every panel
        marks = lines_by_label(ax)
        assert list(marks["best epoch 3"].get_xdata()) == [3.0, 3.0]
        assert list(marks["early stop at epoch 5"].get_xdata()) == [5.0, 5.0]
    assert "offline" in fig._suptitle.get_text()


def test_the_curves_of_a_cosine_run_say_the_schedule_and_join_the_rates():
    cosine = [dict(r, lr=1e-3 * (1 + np.cos(np.pi * r["epoch"] / 5)) / 2) for r in HISTORY]
    ax_lr = viz.plot_curves(cosine, summary=SUMMARY, lr_schedule="cosine").axes[2]
    line = lines_by_label(ax_lr)["learning rate (warm-up + cosine)"]
    np.testing.assert_allclose(line.get_ydata(), [r["lr"] for r in cosine])
    assert line.get_drawstyle() == "default" and ax_lr.get_legend() is not None
    plain = lines_by_label(viz.plot_curves(HISTORY).axes[2])["learning rate"]  # the plateau's: steps, as before
    assert plain.get_drawstyle() == "steps-post"


def test_curves_from_history_without_summary_or_lr(tmp_path):
    hist = [{k: v for k, v in r.items() if k != "lr"} for r in HISTORY[:1]]  # a one-epoch run, no lr column
    fig = viz.plot_curves(hist)
    assert not list(tmp_path.iterdir())  # nothing written without a path
    ax_loss, _, ax_lr = fig.axes
    assert "best epoch" not in " ".join(lines_by_label(ax_loss))
    assert len(ax_lr.lines) == 0
    fig = viz.plot_curves(hist, tmp_path / "c.png", summary={"best_epoch": 1, "stopped_early": False, "stop_epoch": 1})
    labels = " ".join(lines_by_label(fig.axes[0]))
    assert "best epoch 1" in labels and "early stop" not in labels
    assert read_png(tmp_path / "c.png").var() > VAR_FLOOR


def test_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):  # a folder is no history (viz reads no run folder)
        viz.plot_curves(tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        viz.plot_curves([])
    with pytest.raises(ValueError, match="'epoch'"):
        viz.plot_curves([{"loss": 1.0}])


def test_histories_one_figure_for_several_runs(tmp_path):
    other = [dict(r, val_accuracy=r["val_accuracy"] + 0.1) for r in HISTORY]
    fig = viz.plot_histories({"none": HISTORY, "dropout": other}, path=tmp_path / "v.png", dpi=50)
    ax_acc, ax_loss = fig.axes
    lines = lines_by_label(ax_acc)
    np.testing.assert_allclose(lines["none (val)"].get_ydata(), [r["val_accuracy"] for r in HISTORY])
    np.testing.assert_allclose(lines["dropout (val)"].get_ydata(), [r["val_accuracy"] for r in other])
    np.testing.assert_allclose(lines["dropout (train)"].get_ydata(), [r["train_accuracy"] for r in other])
    assert lines["none (val)"].get_color() == lines["none (train)"].get_color()
    assert len(ax_loss.lines) == 2
    img = read_png(tmp_path / "v.png")
    assert img.shape == (225, 600, 3)
    assert img.var() > VAR_FLOOR
    with pytest.raises(ValueError, match="histories"):
        viz.plot_histories({})
