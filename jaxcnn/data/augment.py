"""On-device augmentation (work in progress)."""

from __future__ import annotations


def random_augment(key, images, *, rotation: float = 15.0, width_shift: float = 0.1,
                   height_shift: float = 0.1, horizontal_flip: bool = True):
    """Random rotation/shift/flip of float images ``(N, H, W, C)``; same shape and dtype out."""
    raise NotImplementedError("random_augment: landing shortly")
