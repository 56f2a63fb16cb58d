"""The embedded offline dataset (work in progress: generator lands next)."""

from __future__ import annotations

from jaxcnn.data.core import Dataset


def make_offline_dataset(*, num_train: int = 10000, num_val: int = 2000, num_test: int = 2000,
                         image_size: int = 32, num_classes: int = 10, seed: int = 0) -> Dataset:
    """Generates the embedded offline dataset: uint8 ``(N, image_size, image_size, 3)``."""
    raise NotImplementedError("make_offline_dataset: landing shortly")
