"""Shared pytest set-up: quiet TensorFlow, full float32 precision and deterministic ops on GPUs,
and a hypothesis profile that tolerates JIT compilation time (no per-example deadline)."""

import os

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

from hypothesis import settings  # noqa: E402

settings.register_profile("jaxcnn", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jaxcnn"))
