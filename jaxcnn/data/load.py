"""``load_dataset``: a dataset by name, recording how it was loaded."""

from __future__ import annotations

import dataclasses
import os

from jaxcnn.data.core import Dataset
from jaxcnn.data.folder import load_folder
from jaxcnn.data.offline import make_offline_dataset
from jaxcnn.data.tfds_data import load_cifar10, load_tf_flowers

DATASET_NAMES = ("cifar10", "folder", "offline", "tf_flowers")


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, **kwargs) -> Dataset:
    """Loads a dataset by name.

    Args:
      name: ``"cifar10"`` (:func:`load_cifar10`), ``"folder"`` (``jaxcnn.data.folder.load_folder``:
        ``data_dir`` is a folder of class subfolders of JPEG / PNG images), ``"offline"``
        (:func:`make_offline_dataset`; ``data_dir`` is ignored, nothing is read or written)
        or ``"tf_flowers"`` (:func:`load_tf_flowers`).
      data_dir: tfds data directory (default: tfds' own, ``~/tensorflow_datasets``); for
        ``"folder"``, the image folder (required; recorded as an absolute path).
      seed: seed of the train/val split (and of the generator for ``"offline"``).
      **kwargs: passed on to the loader (e.g. ``val_size=``, ``image_size=``).

    Returns:
      A :class:`Dataset` with uint8 ``(N, H, W, 3)`` images and int32 ``(N,)`` labels, whose
      ``source`` is ``{"name": name, "data_dir": data_dir, "seed": seed, **kwargs}`` (so
      ``load_dataset(**ds.source)`` loads it again).

    Raises:
      ValueError: unknown ``name``; ``"folder"`` without ``data_dir``, or a folder that is not a
        dataset (the message says what it holds).
      DatasetUnavailableError: the dataset cannot be had here (tfds datasets only).
    """
    if name == "cifar10":
        ds = load_cifar10(data_dir, seed=seed, **kwargs)
    elif name == "folder":
        if data_dir is None:
            raise ValueError("load_dataset('folder') needs data_dir: a folder with one subfolder of images per class")
        data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))  # a run reloads it from any cwd
        ds = load_folder(data_dir, seed=seed, **kwargs)
    elif name == "offline":
        ds = make_offline_dataset(seed=seed, **kwargs)
    elif name == "tf_flowers":
        ds = load_tf_flowers(data_dir, seed=seed, **kwargs)
    else:
        raise ValueError(f"load_dataset: unknown name={name!r}; allowed: {', '.join(DATASET_NAMES)}")
    return dataclasses.replace(ds, source={"name": name, "data_dir": data_dir, "seed": seed, **kwargs})
