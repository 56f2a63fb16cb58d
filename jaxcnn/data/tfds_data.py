"""CIFAR-10 and tf_flowers from tensorflow-datasets, as in-memory uint8 splits.

TensorFlow and tfds are imported inside the loaders (importing :mod:`jaxcnn.data`
does not import TensorFlow), and TensorFlow is told to leave the GPUs alone: JAX
owns the accelerator, TF only decodes.

Without network, tfds still prepares a dataset from the archive placed by hand in
``<data_dir>/downloads/manual/`` (``cifar-10-binary.tar.gz`` for CIFAR-10,
``flower_photos.tgz`` for tf_flowers). If neither the network nor that file is
there, the loaders raise :class:`DatasetUnavailableError` at once (a quick
connection probe spares users tfds' minutes of download retries); they never fall
back to another dataset.
"""

from __future__ import annotations

import os
import pathlib
import socket
import urllib.parse

import numpy as np

from jaxcnn.data.core import Dataset, DatasetUnavailableError, Split, seeded_parts

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck")
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
_FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"
_READ_BATCH = 1024  # tf.data batch for reading; tfds mock data cannot do batch_size=-1


def load_cifar10(data_dir: str | None = None, *, val_size: int = 5000, seed: int = 0) -> Dataset:
    """CIFAR-10 from tfds: 45,000 train / 5,000 val / 10,000 test by default.

    The validation set is a seeded random subset of tfds' train split (50,000 images);
    the test split is tfds' test split (10,000). Images uint8 ``(N, 32, 32, 3)``,
    labels int32 ``(N,)``, class names as in the CIFAR-10 release.

    Args:
      data_dir: tfds data directory (default: tfds' own, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). The first call downloads (~170 MB) and prepares.
      val_size: examples moved from train to val, 1 <= val_size < size of the train split.
      seed: seed of the train/val split (int >= 0).

    Returns:
      A :class:`Dataset` named ``"cifar10"``.

    Raises:
      DatasetUnavailableError: no prepared data, no network and no
        ``<data_dir>/downloads/manual/cifar-10-binary.tar.gz``.
      ValueError: bad ``val_size`` or ``seed``.
    """
    _check_int("load_cifar10", "val_size", val_size, minimum=1)
    _check_int("load_cifar10", "seed", seed, minimum=0)
    tfds = _import_tfds()
    builder = tfds.builder("cifar10", data_dir=data_dir)
    _prepare(tfds, builder, "CIFAR-10", _CIFAR10_URL)
    images, labels = _read_split(builder, "train")
    train, val = _split_off(images, labels, [val_size], seed, "load_cifar10", "val_size")
    test = Split(*_read_split(builder, "test"))
    return Dataset(name="cifar10", train=train, val=val, test=test,
                   num_classes=10, class_names=CIFAR10_CLASS_NAMES)


def load_tf_flowers(data_dir: str | None = None, *, image_size: int = 224, val_fraction: float = 0.1,
                    test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """tf_flowers from tfds (3,670 photos, 5 classes), resized to a square.

    tfds has only a train split; it is split here, seeded, into train / val / test.
    Every photo is resized (bilinear, antialiased, aspect ratio not kept) to
    ``(image_size, image_size)`` and rounded to uint8.

    Args:
      data_dir: tfds data directory (default: tfds' own).
      image_size: side of the output images in pixels, >= 8 (default 224, ResNet50's).
      val_fraction, test_fraction: fractions of the photos for val and test, each in
        ``(0, 1)`` with a sum < 1 (default 0.1 each: 2,936 / 367 / 367).
      seed: seed of the split (int >= 0).

    Returns:
      A :class:`Dataset` named ``"tf_flowers"``: uint8 ``(N, image_size, image_size, 3)``,
      int32 ``(N,)``, class names ``("dandelion", "daisy", "tulips", "sunflowers", "roses")``.

    Raises:
      DatasetUnavailableError: no prepared data, no network and no
        ``<data_dir>/downloads/manual/flower_photos.tgz``.
      ValueError: bad sizes, fractions or seed.
    """
    _check_int("load_tf_flowers", "image_size", image_size, minimum=8)
    _check_int("load_tf_flowers", "seed", seed, minimum=0)
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
            raise ValueError(f"load_tf_flowers: {arg}={value!r}; must be a fraction in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"load_tf_flowers: val_fraction + test_fraction = {val_fraction + test_fraction}; "
                         "must be < 1 to leave a train split")
    tfds = _import_tfds()
    builder = tfds.builder("tf_flowers", data_dir=data_dir)
    _prepare(tfds, builder, "tf_flowers", _FLOWERS_URL)
    images, labels = _read_split(builder, "train", image_size=image_size)
    n = len(labels)
    sizes = [max(1, round(val_fraction * n)), max(1, round(test_fraction * n))]
    train, val, test = _split_off(images, labels, sizes, seed, "load_tf_flowers", "val_fraction/test_fraction")
    names = tuple(builder.info.features["label"].names)
    return Dataset(name="tf_flowers", train=train, val=val, test=test,
                   num_classes=len(names), class_names=names)


def _import_tfds():
    """Imports tfds with TensorFlow's GPUs hidden (JAX owns the accelerator). TensorFlow only reads
    and decodes data here: its start-up logs are kept out of the commands' output unless the user
    set them (TF 2.21 prints its oneDNN notice whatever TF_CPP_MIN_LOG_LEVEL says, unless oneDNN
    is off); set now, at the first load, since TensorFlow reads them when it is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing more to do here.
        pass
    import tensorflow_datasets as tfds

    return tfds


def _prepare(tfds, builder, title, url):
    """Downloads and prepares ``builder`` unless done; maps 'cannot be had' to our error."""
    if builder.is_prepared():
        return
    root = pathlib.Path(builder.data_dir).parents[1]           # <data_dir>/<name>/<version>
    manual = root / "downloads" / "manual" / pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
    ways_out = (
        f"Either place {manual.name} (from {url}) in {manual.parent}/ and run again "
        f"(tfds prepares it without network), or run with `--dataset offline` "
        f"(load_dataset('offline'), the project's generated stand-in; it is not {title}).")
    if not manual.exists() and not _download_is_mocked(tfds) and not _reachable(url):
        raise DatasetUnavailableError(f"{title} is not prepared in {root} and {url} cannot be reached. {ways_out}")
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    try:
        builder.download_and_prepare()
    except NonMatchingChecksumError as err:
        where = f"the manually placed {manual}" if manual.exists() else f"the downloaded {title} file"
        raise DatasetUnavailableError(
            f"{where} is corrupt or incomplete (its checksum is not {title}'s): delete it and place a complete "
            f"copy of {url} there, or run with `--dataset offline`.") from err
    except (tfds.download.DownloadError, OSError) as err:  # requests' errors are OSErrors
        raise DatasetUnavailableError(f"{title} could not be downloaded ({type(err).__name__}: {err}). "
                                      f"{ways_out}") from err


def _reachable(url, timeout=5.0):
    """True if a TCP connection to ``url``'s host opens (or a proxy is configured)."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                            "ALL_PROXY", "all_proxy")):
        return True  # cannot probe through a proxy; let tfds try
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_is_mocked(tfds):
    """True inside ``tfds.testing.mock_data``, whose download_and_prepare is a no-op."""
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(fn, "__module__", "").startswith("tensorflow_datasets.testing")


def _read_split(builder, split, image_size=None):
    """Reads a whole split into uint8 ``(N, H, W, 3)`` and int32 ``(N,)`` numpy arrays."""
    import tensorflow as tf

    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if image_size is not None:
        def resize(image, label):  # variable-size photo -> (image_size, image_size, 3) uint8
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label
        ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image, label in ds.batch(_READ_BATCH).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def _split_off(images, labels, sizes, seed, fn, arg):
    """Seeded split: ``[rest, part_1, ..., part_k]`` with ``len(part_i) == sizes[i]``."""
    n = len(labels)
    if sum(sizes) >= n:
        raise ValueError(f"{fn}: {arg} asks for {sum(sizes)} of the {n} training examples; "
                         f"must leave at least one for training (< {n})")
    return [Split(images=images[idx], labels=labels[idx]) for idx in seeded_parts(n, sizes, seed)]


def _check_int(fn, arg, value, *, minimum):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{fn}: {arg}={value!r}; must be an int >= {minimum}")
