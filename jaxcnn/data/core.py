"""Dataset containers: :class:`Split` and :class:`Dataset` (``load_dataset`` is in ``jaxcnn.data.load``).

Every dataset in jaxcnn is three in-memory splits of uint8 images ``(N, H, W, 3)``
and int32 labels ``(N,)``. They are small enough (CIFAR-10 is ~180 MB of uint8) to
be put on device once and sliced there; augmentation then runs inside jit
(:mod:`jaxcnn.data.augment`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxcnn.errors import DatasetUnavailableError  # noqa: F401 (raised by the loaders; its home is light)


def seeded_parts(n: int, sizes, seed: int) -> list[np.ndarray]:
    """A seeded split of ``n`` rows: ``[rest, part_1, ..., part_k]`` index arrays, part ``i`` of
    ``sizes[i]`` rows, each in ascending order (every dataset splits off val / test this way)."""
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[bounds[-1]:])] + [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]



@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
      images: uint8 ``(N, H, W, 3)``, values 0..255, NHWC.
      labels: int32 ``(N,)``, values in ``[0, num_classes)``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise TypeError(
                "Split: images must be a uint8 numpy array of shape (N, H, W, C), got "
                f"{type(images).__name__} dtype={getattr(images, 'dtype', None)} "
                f"shape={getattr(images, 'shape', None)}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
            raise TypeError(
                "Split: labels must be an int32 numpy array of shape (N,), got "
                f"{type(labels).__name__} dtype={getattr(labels, 'dtype', None)} "
                f"shape={getattr(labels, 'shape', None)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Split: images has {images.shape[0]} examples but labels has {labels.shape[0]}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(int(d) for d in self.images.shape[1:])

    def read(self, rows) -> np.ndarray:
        """The images of ``rows`` (an index array), uint8 ``(n, H, W, C)``."""
        return self.images[rows]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset with train / val / test splits of the same image shape.

    Attributes:
      name: e.g. ``"cifar10"``, ``"offline"``, ``"tf_flowers"``.
      train, val, test: :class:`Split` (uint8 ``(N, H, W, C)``, int32 ``(N,)``), or splits read
        from disk as they are needed (``jaxcnn.data.folder.FileSplit``: the same ``labels``,
        ``image_shape`` and ``read(rows)``).
      num_classes: number of classes; labels lie in ``[0, num_classes)``.
      class_names: ``num_classes`` human-readable names, index = label.
      source: how to load it again, ``load_dataset(**source)`` (set by ``load_dataset``;
        None for a dataset built by hand). Runs record it in their ``config.json``.
      fingerprint: what its files were, to tell a changed copy from the same data (a folder's:
        ``jaxcnn.data.folder.fingerprint``; None for the others). Runs record it too.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    source: Optional[dict] = None
    fingerprint: Optional[dict] = None

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Dataset {self.name!r}: {len(self.class_names)} class_names for "
                f"num_classes={self.num_classes}")
        shapes = {s.image_shape for s in (self.train, self.val, self.test)}
        if len(shapes) != 1:
            raise ValueError(f"Dataset {self.name!r}: splits have different image shapes {shapes}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image in every split."""
        return self.train.image_shape
