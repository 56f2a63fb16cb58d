"""Shared pytest set-up: quiet TensorFlow, keep it off any GPU, and a hypothesis profile
that tolerates JIT compilation time (no per-example deadline)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")

from hypothesis import settings  # noqa: E402

settings.register_profile("jaxcnn", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jaxcnn"))
