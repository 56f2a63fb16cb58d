"""The official Keras ImageNet ResNet50 weight files: find, fetch, verify.

``--weights imagenet`` means the file ``keras.applications.ResNet50(weights="imagenet")``
uses, in Keras' cache folder (``$KERAS_HOME/models``, default ``~/.keras/models``): a file
already there is reused once its MD5 matches Keras' published hash; otherwise it is
downloaded (to a ``.part`` file, verified, then renamed into place, so a failed or
corrupt download never replaces a good file). Without network, download the file on
another machine and put it where the error message says.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

# Facts from keras/src/applications/resnet.py (Keras 3.15): URL prefix, names, MD5 hashes.
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
FILES = {
    True: ("resnet50_weights_tf_dim_ordering_tf_kernels.h5", "2cb95161c43110f7111970584f804107"),
    False: ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
}


def keras_cache_dir() -> Path:
    """``$KERAS_HOME/models``, or ``~/.keras/models`` (where Keras keeps these files)."""
    return Path(os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))) / "models"


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file (the hash Keras publishes for its application weights)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` (tests replace this function; they never use the network)."""
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def fetch_imagenet_weights(include_top: bool, *, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Path to the verified official ResNet50 ImageNet weight file, downloading it if needed.

    Args:
      include_top: the file with the 1000-way ``predictions`` layer (98 MB) or the no-top
        file (91 MB).
      cache_dir: folder for the file; default ``keras_cache_dir()`` (shared with Keras).

    Returns:
      The file's path (legacy HDF5; read it with ``jaxcnn.weights.keras_h5.load_keras_h5``).

    Raises:
      RuntimeError: the download failed (no network) or gave a file with the wrong hash;
        the message says where to put the file by hand.
    """
    if not isinstance(include_top, bool):
        raise TypeError(f"fetch_imagenet_weights: include_top must be a bool, got {include_top!r}")
    name, want = FILES[include_top]
    folder = Path(cache_dir) if cache_dir is not None else keras_cache_dir()
    path = folder / name
    url = BASE_URL + name
    by_hand = (
        f"Without network, download {url} elsewhere and copy it to {path} "
        f"(MD5 {want}), or pass the file's path instead of 'imagenet'."
    )
    if path.is_file():
        have = md5sum(path)
        if have == want:
            return path
        stale = f" The file already at {path} has MD5 {have}, not {want}; it is kept until a good download replaces it."
    else:
        stale = ""

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"fetch_imagenet_weights: cannot create {folder} ({e}). {by_hand}") from None
    part = path.with_name(path.name + ".part")
    try:
        _download(url, part)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"fetch_imagenet_weights: could not download {url} ({e}).{stale} {by_hand}") from None
    got = md5sum(part)
    if got != want:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"fetch_imagenet_weights: the download of {url} has MD5 {got}, expected {want} "
            f"(interrupted or altered).{stale} {by_hand}"
        )
    os.replace(part, path)  # atomic: a good file appears whole or not at all
    return path


def resolve_weights(
    weights: Optional[str | os.PathLike], *, include_top: bool, cache_dir: Optional[str | os.PathLike] = None
) -> Optional[Path]:
    """Turn a ``--weights`` value into a file path.

    Args:
      weights: ``"imagenet"`` (the official file, fetched / reused via
        ``fetch_imagenet_weights``), a path to a Keras legacy ``.h5`` file, or ``None``
        (random initialisation: returns ``None``).
      include_top: which official file ``"imagenet"`` means.
      cache_dir: passed to ``fetch_imagenet_weights``.
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"resolve_weights: weights must be 'imagenet', a path or None, got {type(weights).__name__}")
    if str(weights) == "imagenet":
        return fetch_imagenet_weights(include_top, cache_dir=cache_dir)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"resolve_weights: weights={str(weights)!r} is neither 'imagenet' nor an existing file"
        )
    return path
