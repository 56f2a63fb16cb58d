"""python -m jaxcnn.experiments.filters: pictures of the checkpointed kernel (not of anything else),
activations equal to a NumPy convolution, ResNet filters only from real weights or labelled as random."""

import json
import urllib.error

import h5py
import jax
import matplotlib.image as mpimg
import numpy as np
import pytest

from float64_oracle import assert_close_to_float64
from jaxcnn import viz
from jaxcnn.experiments import cifar10, filters
from jaxcnn.experiments.configs import get_config
from jaxcnn.models.resnet import ResNetTiny
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import run_config, state_to_tree


def png(path):
    return mpimg.imread(str(path))[..., :3]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CIFAR-10-experiment workdir whose best checkpoint holds a known first-layer kernel."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = get_config("smoke", dataset="offline", num_train=32, num_val=16, num_test=16)
    data = cifar10.load_data(cfg)
    model = cifar10.build_model(cfg, data.num_classes)
    state = cifar10.create_state(cfg, model, (32, 32, 3))
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, cfg.widths[0])).astype(np.float32)  # (3, 3, 3, 8)
    params = dict(state.params)
    params["block1_conv1"] = {"kernel": jax.numpy.asarray(kernel), "bias": params["block1_conv1"]["bias"] + 0.1}
    state = state.replace(params=params)
    folder = RunFolder(workdir)
    folder.write_config(run_config(state, data, cfg.fit, experiment={"name": "cifar10", **cfg.settings()}))
    folder.write_summary({"test_accuracy": 0.5})
    with folder.checkpoints() as ck:
        ck.save(1, state_to_tree(state), {"epoch": 1}, best=True)
    return workdir, cfg, kernel


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Keras cache and a download that fails as it does offline."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def fail(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("jaxcnn.weights.imagenet._download", fail)


def test_cli_draws_the_checkpointed_kernel_and_says_resnet_is_unavailable(run, tmp_path, no_network, capsys):
    workdir, cfg, kernel = run
    out = tmp_path / "figs"
    assert filters.main(["--run", str(workdir), "--out", str(out)]) == 0
    assert "cannot draw pretrained ResNet50 filters" in capsys.readouterr().err

    restored, init_params, dataset = filters.load_run(workdir)
    params = restored.variables["params"]
    np.testing.assert_array_equal(np.asarray(params["block1_conv1"]["kernel"]), kernel)
    fresh = cifar10.create_state(cfg, cifar10.build_model(cfg, 10), (32, 32, 3)).params  # the run's seed
    np.testing.assert_array_equal(np.asarray(init_params["block1_conv1"]["kernel"]),
                                  np.asarray(fresh["block1_conv1"]["kernel"]))

    # 8 filters -> one row of 8 panels of 100 px, plus 40 px of title
    for name in ("cifar_cnn_filters.png", "cifar_cnn_filters_per_filter.png", "cifar_cnn_filters_init.png",
                 "cifar_cnn_filters_change.png"):
        img = png(out / name)
        assert img.shape == (140, 800, 3) and img.var() > 1e-4
    acts = png(out / "cifar_cnn_activations.png")  # input + 8 maps = 9 panels: 2 rows of 8
    assert acts.shape == (240, 800, 3) and acts.var() > 1e-4
    assert not (out / "resnet50_filters.png").exists()

    record = json.loads((out / "filters.json").read_text())
    assert record["cifar_cnn"]["kernel"]["shape"] == [3, 3, 3, 8]
    assert record["cifar_cnn"]["kernel"]["max"] == pytest.approx(float(kernel.max()))
    assert record["cifar_cnn"]["image_label"] == dataset.class_names[int(dataset.val.labels[0])]
    assert record["cifar_cnn"]["test_accuracy"] == 0.5
    k0 = np.asarray(fresh["block1_conv1"]["kernel"])
    assert record["cifar_cnn"]["relative_change"] == pytest.approx(np.linalg.norm(kernel - k0) / np.linalg.norm(k0))
    image = dataset.val.images[0]
    acts = filters.first_layer_activations(image, kernel, np.asarray(params["block1_conv1"]["bias"]))
    assert record["cifar_cnn"]["dead_maps"] == int(np.sum(acts.max(axis=(0, 1)) <= 0))
    # the run's own model computes the same first-layer maps (what the CLI draws for any run)
    np.testing.assert_allclose(filters.model_activations(restored, image), acts, rtol=1e-5, atol=1e-5)
    assert record["resnet50"]["drawn"] is False and "could not download" in record["resnet50"]["reason"]


def test_panels_hold_the_kernel(run, tmp_path):
    workdir, _, kernel = run
    restored, _, _ = filters.load_run(workdir)
    params = restored.variables["params"]
    assert filters.first_conv_path(params) == ("block1_conv1",)
    fig = viz.plot_filters(filters.first_conv(params)[0])
    assert viz.count_image_panels(fig) == 8
    want = (kernel - kernel.min()) / (kernel.max() - kernel.min())
    np.testing.assert_allclose(np.asarray(fig.axes[5].images[0].get_array()), want[..., 5], atol=1e-6)


def test_first_layer_activations_match_numpy():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    x = np.pad(image / 255.0, ((1, 1), (1, 1), (0, 0)))  # 'SAME' for 3×3
    want = np.zeros((6, 5, 4))
    for i in range(6):
        for j in range(5):
            want[i, j] = np.einsum("hwc,hwco->o", x[i:i + 3, j:j + 3], kernel) + bias
    # float64 oracle; each value a sum of 3 * 3 * 3 products and the bias
    sq = np.zeros((6, 5, 4))
    for i in range(6):
        for j in range(5):
            sq[i, j] = np.einsum("hwc,hwco->o", x[i:i + 3, j:j + 3] ** 2, kernel.astype(np.float64) ** 2) + bias**2
    assert_close_to_float64(filters.first_layer_activations(image, kernel, bias), np.maximum(want, 0), 28, np.sqrt(sq),
                            what="activations")


def write_legacy_h5(path, variables, order):
    """A Keras legacy-HDF5 weight file (the layout of Keras' ImageNet files) from Flax variables."""
    kinds = {"kernel": "kernel", "bias": "bias"}
    bn = (("params", "scale", "gamma"), ("params", "bias", "beta"),
          ("batch_stats", "mean", "moving_mean"), ("batch_stats", "var", "moving_variance"))
    with h5py.File(path, "w") as f:
        names = [n for n in order if n in variables["params"]]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for n in names:
            g = f.create_group(n)
            if n in variables.get("batch_stats", {}):
                items = [(f"{n}/{k}", variables[c][n][fl]) for c, fl, k in bn]
            else:
                items = [(f"{n}/{k}", variables["params"][n][fl]) for fl, k in kinds.items()]
            g.attrs["weight_names"] = [w.encode() for w, _ in items]
            for w, a in items:
                g.create_dataset(w, data=np.asarray(a))


def test_resnet_filters_from_a_weight_file_are_its_conv1_in_rgb(tmp_path):
    model = ResNetTiny(include_top=False)
    variables = jax.jit(lambda k: model.init(k, jax.numpy.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
    path = tmp_path / "tiny_notop.h5"
    write_legacy_h5(path, variables, model.layer_order())
    conv1 = np.asarray(variables["params"]["conv1_conv"]["kernel"])  # (7, 7, 3, 64), BGR input

    kernel, source = filters.resnet_conv1(str(path), model=model)
    np.testing.assert_array_equal(kernel, conv1)
    assert source == str(path)
    rec = filters.draw_resnet(str(path), tmp_path / "out", model=model)
    assert rec["drawn"] and rec["pretrained"] and rec["files"] == ["resnet50_filters.png"]
    img = png(tmp_path / "out" / "resnet50_filters.png")
    assert img.shape == (840, 800, 3) and img.var() > 1e-4  # 64 filters: 8 rows of 8


def test_random_resnet_filters_are_labelled_never_pretrained(tmp_path):
    rec = filters.draw_resnet("random", tmp_path, model=ResNetTiny(include_top=False))
    assert rec["drawn"] and rec["pretrained"] is False
    assert rec["files"] == ["resnet50_filters_random_init.png"] and not (tmp_path / "resnet50_filters.png").exists()
    assert "random" in rec["source"]


def test_unreadable_weight_file_is_reported_not_drawn(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    rec = filters.draw_resnet(str(bad), tmp_path / "out", model=ResNetTiny(include_top=False))
    assert rec["drawn"] is False and "cannot draw pretrained ResNet50 filters" in rec["reason"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_needs_something_to_draw():
    with pytest.raises(SystemExit):
        filters.main(["--resnet_weights", "none"])
