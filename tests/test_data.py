"""jaxcnn.data: containers, the offline dataset, and the tfds loaders on tfds' own mock data.

No test touches the network: sockets are disabled for the whole module. The tests that need
TensorFlow and tensorflow-datasets ask for the ``tfds`` fixture (tests/conftest.py): without
them they are skipped one by one, and the others (incl. the argument checks) still run.
"""

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxcnn.data import (Dataset, DatasetUnavailableError, Split, load_cifar10, load_dataset,
                         load_tf_flowers, make_offline_dataset)
from jaxcnn.data import offline, tfds_data


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def offline_ds():
    return make_offline_dataset(seed=0)


# --- containers and dispatch ---------------------------------------------------------

def test_split_and_dataset_validate():
    images, labels = np.zeros((4, 5, 6, 3), np.uint8), np.arange(4, dtype=np.int32)
    split = Split(images, labels)
    ds = Dataset("x", split, split, split, num_classes=4, class_names=("a", "b", "c", "d"))
    assert ds.image_shape == (5, 6, 3) and len(split) == 4
    with pytest.raises(TypeError, match="uint8.*float32"):
        Split(images.astype(np.float32), labels)
    with pytest.raises(TypeError, match="int32.*int64"):
        Split(images, labels.astype(np.int64))
    with pytest.raises(ValueError, match="4 examples but labels has 3"):
        Split(images, labels[:3])
    with pytest.raises(ValueError, match="3 class_names for num_classes=4"):
        Dataset("x", split, split, split, num_classes=4, class_names=("a", "b", "c"))


def test_load_dataset_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="name='cifar100'.*cifar10, folder, offline, tf_flowers"):
        load_dataset("cifar100")


def test_load_dataset_dispatches_offline():
    a = load_dataset("offline", seed=3, num_train=20, num_val=10, num_test=10)
    b = make_offline_dataset(seed=3, num_train=20, num_val=10, num_test=10)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


def test_importing_data_does_not_import_tensorflow():
    code = "import sys, jaxcnn.data; sys.exit(int('tensorflow' in sys.modules))"
    repo = pathlib.Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0


# --- the offline dataset ---------------------------------------------------------------

def test_offline_shapes_dtypes_and_names(offline_ds):
    ds = offline_ds
    assert ds.name == "offline" and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    assert ds.class_names == offline.CLASS_NAMES and len(set(ds.class_names)) == 10
    for split, n in ((ds.train, 10000), (ds.val, 2000), (ds.test, 2000)):
        assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == np.int32
        # Balanced: every class exactly n / 10 times.
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), np.full(10, n // 10))
    # Images use the whole intensity range and are not constant.
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    assert ds.train.images.reshape(10000, -1).std(axis=1).min() > 5


def test_offline_is_deterministic_per_seed():
    kw = dict(num_train=50, num_val=20, num_test=20)
    a, b, c = make_offline_dataset(seed=7, **kw), make_offline_dataset(seed=7, **kw), make_offline_dataset(seed=8, **kw)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name).images, getattr(b, name).images)
        np.testing.assert_array_equal(getattr(a, name).labels, getattr(b, name).labels)
        assert not np.array_equal(getattr(a, name).images, getattr(c, name).images)
    assert not np.array_equal(a.val.images, a.test.images[:20])
    # Each split has its own stream: the train size does not change the test set.
    d = make_offline_dataset(seed=7, num_train=80, num_val=20, num_test=20)
    np.testing.assert_array_equal(a.test.images, d.test.images)


def test_offline_other_sizes_and_class_counts():
    ds = make_offline_dataset(num_train=31, num_val=7, num_test=5, image_size=48, num_classes=3, seed=1)
    assert ds.image_shape == (48, 48, 3) and ds.class_names == ("disk", "ring", "square")
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [11, 10, 10])
    assert set(np.unique(ds.test.labels)) <= {0, 1, 2}


def _nearest_class_mean_accuracy(train_x, train_y, test_x, test_y, num_classes=10):
    means = np.stack([train_x[train_y == c].mean(axis=0) for c in range(num_classes)])
    dist = (test_x ** 2).sum(1)[:, None] - 2.0 * test_x @ means.T + (means ** 2).sum(1)[None]
    return float((dist.argmin(axis=1) == test_y).mean())


def _spectrum(images):
    """Translation-invariant features: log |FFT| of the grey image, (N, H*W)."""
    grey = images.astype(np.float32).mean(axis=-1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.fft2(grey))).reshape(len(images), -1)


def test_offline_is_neither_trivial_nor_noise(offline_ds):
    ds = offline_ds
    raw = _nearest_class_mean_accuracy(ds.train.images.reshape(10000, -1) / 255.0, ds.train.labels,
                                       ds.test.images.reshape(2000, -1) / 255.0, ds.test.labels)
    fft = _nearest_class_mean_accuracy(_spectrum(ds.train.images), ds.train.labels,
                                       _spectrum(ds.test.images), ds.test.labels)
    # Measured (seed 0): raw pixels 10.1 % (chance: colour and position say nothing),
    # |FFT| spectrum 43.9 % (the classes are real, but not trivially separable).
    assert raw < 0.15
    assert 0.25 < fft < 0.75


@pytest.mark.parametrize("kwargs, words", [
    ({"num_train": 0}, "num_train=0"),
    ({"num_val": 1.5}, "num_val=1.5"),
    ({"image_size": 8}, "image_size=8"),
    ({"num_classes": 11}, "num_classes=11.*2..10"),
    ({"seed": -1}, "seed=-1"),
])
def test_offline_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        make_offline_dataset(**kwargs)


# --- CIFAR-10 and tf_flowers through tfds ---------------------------------------------


def _mock_split(tfds, name, split, data_dir):
    """The mock examples as tfds itself yields them: uint8 (N, H, W, 3), int (N,)."""
    ds = tfds.load(name, split=split, data_dir=str(data_dir), as_supervised=True, shuffle_files=False)
    pairs = list(ds.as_numpy_iterator())
    return [p[0] for p in pairs], np.array([p[1] for p in pairs])


def _rows(images):
    return sorted(img.tobytes() for img in images)


def test_cifar10_on_mock_data(tmp_path, tfds):
    with tfds.testing.mock_data(num_examples=40):
        ds = load_dataset("cifar10", data_dir=str(tmp_path), val_size=7, seed=1)
        again = load_cifar10(str(tmp_path), val_size=7, seed=1)
        other = load_cifar10(str(tmp_path), val_size=7, seed=2)
        ref_train, _ = _mock_split(tfds, "cifar10", "train", tmp_path)
        ref_test, ref_test_labels = _mock_split(tfds, "cifar10", "test", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names[0] == "airplane"
    assert ds.image_shape == (32, 32, 3) and ds.train.images.dtype == np.uint8
    assert len(ds.train) == 33 and len(ds.val) == 7 and ds.train.labels.dtype == np.int32
    # train + val is exactly tfds' train split; test is tfds' test split, in order.
    assert _rows(np.concatenate([ds.train.images, ds.val.images])) == _rows(ref_train)
    assert not set(_rows(ds.train.images)) & set(_rows(ds.val.images))
    np.testing.assert_array_equal(ds.test.images, np.stack(ref_test))
    np.testing.assert_array_equal(ds.test.labels, ref_test_labels)
    # The split is a function of the seed.
    np.testing.assert_array_equal(ds.val.images, again.val.images)
    assert _rows(ds.val.images) != _rows(other.val.images)


def test_cifar10_val_size_must_leave_training_data(tmp_path, tfds):
    with tfds.testing.mock_data(num_examples=10):
        with pytest.raises(ValueError, match="val_size asks for 10 of the 10"):
            load_cifar10(str(tmp_path), val_size=10)
    with pytest.raises(ValueError, match="val_size=0"):
        load_cifar10(str(tmp_path), val_size=0)


def _assert_names_both_ways_out(message, tmp_path, filename):
    assert filename in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert "--dataset offline" in message


@pytest.mark.usefixtures("tfds")
def test_cifar10_unavailable_without_network_or_manual_file(tmp_path):
    # The real probe runs and finds no network (sockets are disabled in this module).
    with pytest.raises(DatasetUnavailableError, match="cannot be reached") as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert isinstance(info.value, RuntimeError)
    _assert_names_both_ways_out(str(info.value), tmp_path, "cifar-10-binary.tar.gz")


def test_cifar10_download_failure_becomes_unavailable(tmp_path, monkeypatch, tfds):
    # The probe passes (e.g. a proxy) but the download itself fails.
    def fail(self, *args, **kwargs):
        raise tfds.download.DownloadError("Failed to get url: HTTP code 503")
    monkeypatch.setattr(tfds_data, "_reachable", lambda url: True)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fail)
    with pytest.raises(DatasetUnavailableError, match="DownloadError: Failed to get url") as info:
        load_cifar10(str(tmp_path))
    assert isinstance(info.value.__cause__, tfds.download.DownloadError)
    _assert_names_both_ways_out(str(info.value), tmp_path, "cifar-10-binary.tar.gz")


@pytest.mark.usefixtures("tfds")
def test_tf_flowers_unavailable_names_its_manual_file(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_tf_flowers(str(tmp_path), image_size=16)
    _assert_names_both_ways_out(str(info.value), tmp_path, "flower_photos.tgz")


def test_tf_flowers_on_mock_data(tmp_path, tfds):
    import tensorflow as tf

    with tfds.testing.mock_data(num_examples=30):
        ds = load_dataset("tf_flowers", data_dir=str(tmp_path), image_size=12, seed=0)
        ref_images, ref_labels = _mock_split(tfds, "tf_flowers", "train", tmp_path)
    assert ds.num_classes == 5 and ds.class_names == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (24, 3, 3)
    assert ds.image_shape == (12, 12, 3) and ds.test.images.dtype == np.uint8
    assert len({img.shape for img in ref_images}) > 1  # the mock photos have various sizes
    # Every output image is tf.image.resize (antialiased bilinear) of a mock photo, rounded.
    expected = [np.clip(np.round(tf.image.resize(img, (12, 12), antialias=True).numpy()), 0, 255).astype(np.uint8)
                for img in ref_images]
    got = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert _rows(got) == _rows(expected)
    got_labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    np.testing.assert_array_equal(np.bincount(got_labels, minlength=5), np.bincount(ref_labels, minlength=5))


@pytest.mark.parametrize("kwargs, words", [
    ({"image_size": 4}, "image_size=4"),
    ({"val_fraction": 0.0}, "val_fraction=0.0"),
    ({"test_fraction": 1.2}, "test_fraction=1.2"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
])
def test_tf_flowers_rejects_bad_arguments(kwargs, words):
    # Checked before tfds is imported: runs without TensorFlow too.
    with pytest.raises(ValueError, match=words):
        load_tf_flowers(None, **kwargs)


@pytest.mark.usefixtures("tfds")
def test_manual_file_is_used_without_network(tmp_path):
    # With the archive in downloads/manual/, no probe blocks the way: tfds itself reads the
    # file (this dummy fails tfds' checksum, which proves tfds looked at it, offline), and its
    # checksum error becomes one that names the file and what to do.
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(DatasetUnavailableError, match="checksum") as info:
        load_cifar10(str(tmp_path))
    assert f"the manually placed {manual / 'cifar-10-binary.tar.gz'} is corrupt or incomplete" in str(info.value)
    assert type(info.value.__cause__).__name__ == "NonMatchingChecksumError"
    assert (manual / "cifar-10-binary.tar.gz").read_bytes() == b"not the real archive"  # left untouched
