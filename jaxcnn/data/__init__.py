"""Datasets as in-memory uint8 splits, and on-device augmentation.

>>> from jaxcnn.data import load_dataset
>>> ds = load_dataset("offline", seed=0)      # no network needed
>>> ds.train.images.shape, ds.train.images.dtype
((10000, 32, 32, 3), dtype('uint8'))

``load_dataset("cifar10")`` reads CIFAR-10 through tensorflow-datasets; without network
place ``cifar-10-binary.tar.gz`` in ``<data_dir>/downloads/manual/``. Importing this
package does not import TensorFlow. ``load_dataset("folder", data_dir="photos/")`` reads a
folder of class subfolders of JPEG / PNG images (``jaxcnn.data.folder``).
"""

from jaxcnn.data import augment
from jaxcnn.data.augment import AugmentConfig
from jaxcnn.data.core import Dataset, DatasetUnavailableError, Split
from jaxcnn.data.folder import ImageReadError, decode_image, load_folder, scan_folder
from jaxcnn.data.load import DATASET_NAMES, load_dataset
from jaxcnn.data.offline import make_offline_dataset
from jaxcnn.data.tfds_data import load_cifar10, load_tf_flowers

__all__ = [
    "AugmentConfig",
    "DATASET_NAMES",
    "Dataset",
    "DatasetUnavailableError",
    "ImageReadError",
    "Split",
    "augment",
    "decode_image",
    "load_cifar10",
    "load_dataset",
    "load_folder",
    "load_tf_flowers",
    "make_offline_dataset",
    "scan_folder",
]
