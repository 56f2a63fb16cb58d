"""The Keras HDF5 converter's contract (both naming styles, loud failures) and the
ImageNet fetch logic (cache, hash, no network) — on a tiny Keras ResNet and mocked downloads.

The tests that need Keras ask for the ``keras`` fixture (tests/conftest.py), directly or through
``tiny_files``: without Keras they are skipped one by one, and the others still run."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere

import hashlib
import urllib.error

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import fan_ins, two_float32_networks_tolerance  # noqa: E402
from jaxcnn.models.resnet import ResNetTiny  # noqa: E402
from jaxcnn.weights import imagenet  # noqa: E402
from jaxcnn.weights.keras_h5 import load_keras_h5  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


def keras_tiny(include_top, seed):
    """Keras' own ResNet builder with one block per stage: the layers of ``ResNetTiny``."""
    from keras.src.applications import resnet as keras_resnet

    def stack_fn(x):
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, stride1=1, name="conv2")
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, name="conv3")
        x = keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv4")
        return keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv5")

    model = keras_resnet.ResNet(
        stack_fn, preact=False, use_bias=True, include_top=include_top, weights=None,
        input_shape=(32, 32, 3), classes=10, classifier_activation=None, name="tiny",
    )
    rng = np.random.default_rng(seed)
    for w in model.weights:
        v = rng.uniform(0.5, 1.5, w.shape) if w.path.endswith(("gamma", "variance")) else rng.normal(0, 0.3, w.shape)
        w.assign(v.astype(np.float32))
    return model


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, keras):
    """{include_top: (keras model, legacy .h5 path)}"""
    from keras.src.legacy.saving import legacy_h5_format

    out = {}
    for top in (True, False):
        model = keras_tiny(top, seed=int(top))
        path = tmp_path_factory.mktemp("tiny") / f"tiny_top{int(top)}.h5"
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
        out[top] = (model, path)
    return out


def keras_values(model):
    return {w.path: np.asarray(w.numpy()) for w in model.weights}


def check_equal_to_keras(variables, model):
    vals = keras_values(model)
    flax_of = {"kernel": ("params", "kernel"), "bias": ("params", "bias"), "gamma": ("params", "scale"),
               "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}
    for path, want in vals.items():
        layer, w = path.rsplit("/", 1)
        col, name = flax_of[w]
        np.testing.assert_array_equal(np.asarray(variables[col][layer][name]), want, err_msg=path)
    assert sum(a.size for a in jax.tree.leaves(variables)) == sum(a.size for a in vals.values())


def rewrite(src, dst, edit):
    """Copy a legacy file, letting ``edit(h5file)`` change the copy."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


# --------------------------------------------------------------------------- converter


@pytest.mark.parametrize("top", [True, False])
def test_keras3_names_convert_exactly_and_compute_like_keras(tiny_files, top):
    model, path = tiny_files[top]
    variables = load_keras_h5(path, include_top=top, model=ResNetTiny(include_top=top))
    check_equal_to_keras(variables, model)
    x = np.random.default_rng(0).normal(0, 50, (2, 32, 32, 3)).astype(np.float32)
    got = ResNetTiny(include_top=top, classifier_activation=None).apply(variables, jnp.asarray(x), train=False)
    want = np.asarray(model(x, training=False))
    # Keras in float32 is the reference: both roundings, from eps32 and the network's sums (any CPU)
    tol = two_float32_networks_tolerance(fan_ins(variables["params"]), np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol)


def _strs(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def add_tf_suffix(f):
    """Rename every weight ``layer/kernel`` -> ``layer/kernel:0``, as TF-era Keras wrote them."""
    for lname in _strs(f.attrs["layer_names"]):
        g = f[lname]
        names = _strs(g.attrs["weight_names"])
        for n in names:
            g.move(n, n + ":0")
        g.attrs["weight_names"] = [(n + ":0").encode() for n in names]


def test_tf_era_names_with_colon_zero(tiny_files, tmp_path):
    model, path = tiny_files[True]
    old = rewrite(path, tmp_path / "tf_era.h5", add_tf_suffix)
    with h5py.File(old) as f:
        assert "conv1_conv/kernel:0" in _strs(f["conv1_conv"].attrs["weight_names"])
    check_equal_to_keras(load_keras_h5(old, include_top=True, model=ResNetTiny()), model)


def test_full_model_file_under_model_weights(tiny_files, tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    model, _ = tiny_files[False]
    path = tmp_path / "full.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f.create_group("model_weights"), model)
    check_equal_to_keras(load_keras_h5(path, include_top=False, model=ResNetTiny(include_top=False)), model)


def test_top_file_for_notop_model_lists_the_extra_layer(tiny_files):
    with pytest.raises(ValueError, match=r"(?s)35 layers with weights, the model 34.*unexpected in the file: predictions"):
        load_keras_h5(tiny_files[True][1], include_top=False, model=ResNetTiny(include_top=False))
    with pytest.raises(ValueError, match=r"missing from the file: predictions"):
        load_keras_h5(tiny_files[False][1], include_top=True, model=ResNetTiny(include_top=True))


def test_wrong_shape_is_listed(tiny_files):
    with pytest.raises(ValueError, match=r"predictions/kernel: shape \(32, 10\) in the file, model expects \(32, 7\)"):
        load_keras_h5(tiny_files[True][1], include_top=True, model=ResNetTiny(classes=7))
    # Wider blocks: every mismatch is reported, the list is cut short after 25.
    with pytest.raises(ValueError, match=r"(?s)conv2_block1_1_conv/kernel: shape \(1, 1, 64, 4\) in the file, model expects \(1, 1, 64, 8\).*and 25 more"):
        load_keras_h5(tiny_files[True][1], include_top=True, model=ResNetTiny(filters=(8, 8, 8, 8)))


def test_renamed_layer_fails_by_default_and_loads_by_order_like_keras(tiny_files, tmp_path):
    model, path = tiny_files[False]

    def rename(f):
        names = _strs(f.attrs["layer_names"])
        f.move("conv3_block1_2_conv", "conv2d_7")  # an auto-named layer (weight names keep theirs)
        f.attrs["layer_names"] = [("conv2d_7" if n == "conv3_block1_2_conv" else n).encode() for n in names]

    renamed = rewrite(path, tmp_path / "renamed.h5", rename)
    with pytest.raises(ValueError, match=r"model has 'conv3_block1_2_conv', file has 'conv2d_7'"):
        load_keras_h5(renamed, include_top=False, model=ResNetTiny(include_top=False))
    loaded = load_keras_h5(renamed, include_top=False, model=ResNetTiny(include_top=False), check_names=False)
    check_equal_to_keras(loaded, model)


def test_missing_weight_is_named(tiny_files, tmp_path):
    def drop_bias(f):
        g = f["conv1_conv"]
        g.attrs["weight_names"] = [b"conv1_conv/kernel"]

    bad = rewrite(tiny_files[False][1], tmp_path / "nobias.h5", drop_bias)
    with pytest.raises(ValueError, match=r"conv1_conv: file has 1 weights \['conv1_conv/kernel'\], expected \['kernel', 'bias'\]"):
        load_keras_h5(bad, include_top=False, model=ResNetTiny(include_top=False))


def test_truncated_foreign_and_missing_files(tiny_files, tmp_path):
    data = tiny_files[False][1].read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated|damaged"):
        load_keras_h5(truncated, include_top=False, model=ResNetTiny(include_top=False))
    text = tmp_path / "page.h5"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"cannot read .* as HDF5"):
        load_keras_h5(text, include_top=False)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["layers/dense/vars/0"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"not a Keras legacy weight file .*'layers'"):
        load_keras_h5(foreign, include_top=False)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_keras_h5(tmp_path / "nope.h5", include_top=False)
    with pytest.raises(TypeError, match="include_top"):
        load_keras_h5(foreign, include_top="yes")


# --------------------------------------------------------------------------- imagenet fetch


def test_official_names_and_hashes_are_keras(keras):
    from keras.src.applications import resnet as keras_resnet

    top, notop = keras_resnet.WEIGHTS_HASHES["resnet50"]
    assert imagenet.FILES[True] == ("resnet50_weights_tf_dim_ordering_tf_kernels.h5", top)
    assert imagenet.FILES[False] == ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", notop)
    assert imagenet.BASE_URL == keras_resnet.BASE_WEIGHTS_PATH


@pytest.fixture
def fake_official(monkeypatch, tmp_path):
    """KERAS_HOME in tmp, an official 'file' of known bytes, and a downloader that logs calls."""
    payload = b"pretend these are ResNet50 weights"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setitem(imagenet.FILES, False, ("notop.h5", hashlib.md5(payload).hexdigest()))
    calls = []

    def download(url, dest):
        calls.append(url)
        dest.write_bytes(payload)

    monkeypatch.setattr(imagenet, "_download", download)
    return payload, calls


def test_fetch_downloads_into_keras_home_then_reuses(fake_official, tmp_path):
    payload, calls = fake_official
    path = imagenet.fetch_imagenet_weights(False)
    assert path == tmp_path / "kh" / "models" / "notop.h5"
    assert path.read_bytes() == payload
    assert calls == [imagenet.BASE_URL + "notop.h5"]
    assert imagenet.fetch_imagenet_weights(False) == path  # reused, not fetched again
    assert len(calls) == 1
    assert imagenet.resolve_weights("imagenet", include_top=False) == path
    assert not list(path.parent.glob("*.part"))


def test_bad_download_never_replaces_and_says_where_to_put_the_file(fake_official, monkeypatch, tmp_path):
    folder = tmp_path / "kh" / "models"
    folder.mkdir(parents=True)
    (folder / "notop.h5").write_bytes(b"user's old file")
    monkeypatch.setattr(imagenet, "_download", lambda url, dest: dest.write_bytes(b"half a fi"))
    with pytest.raises(RuntimeError, match=r"(?s)MD5 .*expected.*copy it to .*notop\.h5"):
        imagenet.fetch_imagenet_weights(False)
    assert (folder / "notop.h5").read_bytes() == b"user's old file"
    assert not (folder / "notop.h5.part").exists()


def test_no_network_gives_clear_error(fake_official, monkeypatch, tmp_path):
    def offline(url, dest):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(imagenet, "_download", offline)
    with pytest.raises(RuntimeError, match=r"(?s)could not download .*notop\.h5.*Without network.*copy it to "
                       + str(tmp_path / "kh" / "models" / "notop.h5")):
        imagenet.fetch_imagenet_weights(False)


def test_hand_placed_file_is_used_without_download(fake_official, tmp_path):
    payload, calls = fake_official
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "notop.h5").write_bytes(payload)
    assert imagenet.fetch_imagenet_weights(False, cache_dir=folder) == folder / "notop.h5"
    assert calls == []


def test_resolve_weights_paths_and_errors(tmp_path):
    f = tmp_path / "mine.h5"
    f.write_bytes(b"x")
    assert imagenet.resolve_weights(None, include_top=True) is None
    assert imagenet.resolve_weights(str(f), include_top=True) == f
    with pytest.raises(FileNotFoundError, match="neither 'imagenet' nor an existing file"):
        imagenet.resolve_weights(str(tmp_path / "missing.h5"), include_top=True)
    with pytest.raises(TypeError, match="weights must be"):
        imagenet.resolve_weights(3, include_top=True)


# --------------------------------------------------------------------------- into a fine-tuning model


def test_with_backbone_variables_puts_converted_weights_under_backbone(tiny_files):
    from jaxcnn.models.resnet import Classifier, with_backbone_variables

    kmodel, path = tiny_files[False]
    converted = load_keras_h5(path, include_top=False, model=ResNetTiny(include_top=False))
    clf = Classifier(ResNetTiny(include_top=False, pooling="avg"), num_classes=3)
    x = np.random.default_rng(1).normal(0, 50, (2, 32, 32, 3)).astype(np.float32)
    fresh = jax.jit(lambda k: clf.init(k, jnp.asarray(x), train=False))(jax.random.key(0))
    variables = with_backbone_variables(fresh, converted)
    assert variables["params"]["backbone"]["conv1_conv"]["kernel"] is converted["params"]["conv1_conv"]["kernel"]
    assert variables["params"]["head"] is fresh["params"]["head"]
    logits = clf.apply(variables, jnp.asarray(x), train=False)
    feats = np.asarray(kmodel(x, training=False)).mean(axis=(1, 2))  # Keras no-top map, averaged
    head = variables["params"]["head"]
    want = feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    tol = two_float32_networks_tolerance(fan_ins(variables["params"]), np.abs(want).max())
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=tol)
    wrong = load_keras_h5(tiny_files[True][1], include_top=True, model=ResNetTiny())
    with pytest.raises(ValueError, match="do not match"):
        with_backbone_variables(fresh, wrong)


def test_model_rejects_bad_arguments():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="pooling='mean'"):
        ResNetTiny(include_top=False, pooling="mean").init(jax.random.key(0), x, train=False)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        ResNetTiny().init(jax.random.key(0), x, train=1)
    with pytest.raises(ValueError, match=r"frozen_bn names not in this model: \['conv9_bn'\]"):
        ResNetTiny().init(jax.random.key(0), x, train=True, frozen_bn=frozenset({"conv9_bn"}))
    with pytest.raises(TypeError, match="float"):
        ResNetTiny().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), train=False)
