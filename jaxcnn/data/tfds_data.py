"""CIFAR-10 and tf_flowers from tensorflow-datasets (work in progress)."""

from __future__ import annotations

from jaxcnn.data.core import Dataset


def load_cifar10(data_dir: str | None = None, *, val_size: int = 5000, seed: int = 0) -> Dataset:
    """CIFAR-10: 45,000 train / 5,000 val / 10,000 test, uint8 ``(N, 32, 32, 3)``."""
    raise NotImplementedError("load_cifar10: landing shortly")


def load_tf_flowers(data_dir: str | None = None, *, image_size: int = 224, val_fraction: float = 0.1,
                    test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """tf_flowers (5 classes) resized to ``(image_size, image_size, 3)`` uint8."""
    raise NotImplementedError("load_tf_flowers: landing shortly")
