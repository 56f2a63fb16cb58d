"""Pretrained weights: Keras HDF5 files -> Flax variables, and the official ImageNet files.

* :func:`load_keras_h5` — a Keras legacy-HDF5 ResNet50 weight file -> ``{"params", "batch_stats"}``.
* :func:`fetch_imagenet_weights` / :func:`resolve_weights` — the file
  ``keras.applications.ResNet50(weights="imagenet")`` uses, fetched into the Keras cache
  (hash-checked, reused when present), or a path of your own.
"""

from jaxcnn.weights.imagenet import fetch_imagenet_weights, keras_cache_dir, resolve_weights
from jaxcnn.weights.keras_h5 import load_keras_h5

__all__ = ["load_keras_h5", "fetch_imagenet_weights", "resolve_weights", "keras_cache_dir"]
