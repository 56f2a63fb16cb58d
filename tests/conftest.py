"""Shared pytest set-up: quiet TensorFlow, full float32 precision and deterministic ops on GPUs,
a compilation cache for the session, a hypothesis profile that tolerates JIT compilation time
(no per-example deadline), and the ``keras`` / ``tfds`` fixtures: a test that asks for one is
skipped, on its own, where that package is not installed (the rest of its file still runs)."""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")
# The tests compare against NumPy and Keras at 1e-4 to 1e-6 and resume runs bit for bit. On a
# GPU, float32 convolutions and matmuls default to TF32 (measured on an H100: ResNet50's logits
# differ from Keras' by up to 2.6e-4 of their scale, the CIFAR CNN's by 1.2e-4) and XLA may pick
# different, non-deterministic kernels in two compilations (a resumed run then differs). So the
# tests ask for full float32 precision and deterministic GPU ops; neither changes anything on a CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
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


def pytest_sessionfinish(session, exitstatus):
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
