"""Shared pytest set-up: quiet TensorFlow, full float32 precision and deterministic ops on GPUs,
a compilation cache for the session, a hypothesis profile that tolerates JIT compilation time
(no per-example deadline), and the ``keras`` / ``tfds`` fixtures: a test that asks for one is
skipped, on its own, where that package is not installed (the rest of its file still runs)."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")
# NumPy's BLAS (OpenBLAS) on one thread: the float64 oracles' matrix products are small, the suite
# runs one worker per core, and OpenBLAS threads spinning on a busy core made an oracle 5x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The tests compare against NumPy and Keras at 1e-4 to 1e-6 and resume runs bit for bit. On a
# GPU, float32 convolutions and matmuls default to TF32 (measured on an H100: ResNet50's logits
# differ from Keras' by up to 2.6e-4 of their scale, the CIFAR CNN's by 1.2e-4) and XLA may pick
# different, non-deterministic kernels in two compilations (a resumed run then differs). So the
# tests ask for full float32 precision and deterministic GPU ops; neither changes anything on a CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The convolutions' backend is the user's: JAXCNN_KERNELS (auto, onednn, xla) from the environment,
# so `JAXCNN_KERNELS=xla make test` runs the whole suite on XLA's path; tests/test_kernels.py holds
# both backends to the float64 reference whatever it says.
if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()

# Many tests train the same tiny models, each `fit` compiling its own steps (the library keeps no
# compiled functions between calls). JAX's persistent compilation cache lets a program compiled once
# in this session (in this process or a subprocess test) be loaded instead of compiled again, several
# times faster on the 2-core CI machine. A fresh directory per session, so nothing compiled by other
# code is ever reused.
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcnn-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs recur too
    # jaxlib 0.10.1 logs two ~2 KB C++ ERROR lines at every load from that cache on CPUs whose LLVM
    # target carries the tuning flags +prefer-no-gather / +prefer-no-scatter (AMD Zen 4; openxla/xla#44565):
    # a subprocess test that reads its child's stdout first would then block on a full stderr pipe.
    # Only FATAL C++ logs in the tests (Python's warnings and the commands' own messages are unaffected).
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The tests' garbage is collected here, before the worker reports its end (xdist sends that
        # after this hook), and the rest of the heap frozen: pytest's unconfigure collects again
        # (`gc_collect_harder`, five full collections over TensorFlow's, Keras' and JAX's objects: about
        # 2 s measured), and once the worker has reported, execnet gives it 5 s to end, then sends it
        # SIGINT. Under load it missed that, and a passing `make test` printed a KeyboardInterrupt
        # traceback from JAX's gc callback (`_xla_gc_callback`).
        for _ in range(5):
            if not gc.collect():
                break
        gc.freeze()
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("jaxcnn", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jaxcnn"))


@pytest.fixture(scope="session")
def keras():
    """The ``keras`` module (JAX backend, see KERAS_BACKEND above); skips the test without Keras."""
    return pytest.importorskip("keras")


@pytest.fixture(scope="session")
def tfds():
    """The ``tensorflow_datasets`` module; skips the test without TensorFlow or tensorflow-datasets
    (jaxcnn's tfds loaders need both)."""
    pytest.importorskip("tensorflow")
    return pytest.importorskip("tensorflow_datasets")


# ---------------------------------------------------------------------------- a folder of photos

PHOTO_CLASSES = 3  # the first three classes of the embedded generator: disk, ring, square
PHOTOS_PER_CLASS = 14
# How each class's i-th image is written (i % 6): (format, mode, (width, height)).
PHOTO_VARIANTS = (("PNG", "RGB", (32, 32)), ("PNG", "RGB", (48, 40)), ("PNG", "L", (32, 32)),
                  ("PNG", "RGBA", (32, 32)), ("JPEG", "RGB", (64, 64)), ("JPEG", "L", (24, 20)))


def write_photo_folder(root, *, classes=PHOTO_CLASSES, per_class=PHOTOS_PER_CLASS, bad_files=True, seed=0):
    """Writes real image files from the embedded generator's 32x32 images into ``root/<class>/``:
    PNG and JPEG, RGB, greyscale (L) and RGBA (alpha ramp), of mixed sizes (``PHOTO_VARIANTS``).
    With ``bad_files``: a truncated JPEG (``disk/broken.jpg``, its header intact), garbage bytes
    named ``ring/garbage.jpg``, a text file ``square/notes.txt``, and a hidden ``.DS_Store``.

    Returns ``{"files": [{"path", "class", "format", "mode", "size", "source"}, ...], "bad": [paths]}``
    where ``source`` is the uint8 (32, 32, 3) generator image the file was made from.
    """
    import pathlib

    import numpy as np
    from PIL import Image

    from jaxcnn.data import make_offline_dataset

    root = pathlib.Path(root)
    data = make_offline_dataset(num_train=classes * per_class * 2, num_val=1, num_test=1, num_classes=classes,
                                seed=seed).train
    files, bad = [], []
    for c, name in enumerate(("disk", "ring", "square", "triangle", "plus")[:classes]):
        (root / name).mkdir(parents=True, exist_ok=True)
        sources = data.images[data.labels == c][:per_class]
        for i, src in enumerate(sources):
            fmt, mode, size = PHOTO_VARIANTS[i % len(PHOTO_VARIANTS)]
            img = Image.fromarray(src)
            if size != (32, 32):
                img = img.resize(size, Image.BILINEAR)
            if mode == "L":
                img = img.convert("L")
            elif mode == "RGBA":
                alpha = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))  # left clear, right opaque
                img = Image.fromarray(np.dstack([np.asarray(img), alpha]), "RGBA")
            path = root / name / f"{name}_{i:02d}.{'png' if fmt == 'PNG' else 'jpg'}"
            img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            files.append({"path": str(path), "class": name, "format": fmt, "mode": mode, "size": size,
                          "source": src})
    if bad_files:
        jpeg = pathlib.Path(next(f["path"] for f in files if f["format"] == "JPEG" and f["class"] == "disk"))
        whole = jpeg.read_bytes()
        (root / "disk" / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # the header is whole, the data not
        (root / "ring" / "garbage.jpg").write_bytes(np.random.default_rng(seed).bytes(500))
        (root / "square" / "notes.txt").write_text("not an image\n")
        (root / "disk" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        bad = [str(root / "disk" / "broken.jpg"), str(root / "ring" / "garbage.jpg"), str(root / "square" / "notes.txt")]
    return {"files": files, "bad": bad}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """``(root, manifest)``: a folder of class subfolders of real PNG / JPEG files, written once per
    session by :func:`write_photo_folder` (3 classes x 14 images, 3 bad files). Do not modify it."""
    root = tmp_path_factory.mktemp("photos")
    return root, write_photo_folder(root)
