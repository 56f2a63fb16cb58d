"""The installed JAX computes what it should: known wrong-result bugs of a release, as their own
reproducers, fail here rather than in a user's training run (pyproject.toml excludes the releases)."""

import importlib.metadata
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype,n", [("float64", 16_385), ("float32", 32_769)])
def test_jit_equals_eager_for_a_vmapped_matrix_vector_product_and_sum(dtype, n):
    """jax-ml/jax#39103: jax / jaxlib 0.10.2 on the CPU returns a wrong last element under jit
    (268435456 eager, 267911424 jit in float64; 0.10.1 agrees). The exact value is (n - 1)**2."""
    with jax.enable_x64(dtype == "float64"):
        i = jnp.arange(n, dtype=dtype)
        x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
        matrix = jnp.eye(3, dtype=dtype)

        def f(x):
            return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)

        eager, jitted = float(f(x)[-1]), float(jax.jit(f)(x)[-1])
    assert eager == jitted == float(n - 1) ** 2, (jax.__version__, eager, jitted)


def test_the_supported_range_excludes_the_known_bad_releases():
    text = (ROOT / "pyproject.toml").read_text()
    for name in ("jax", "jaxlib"):
        spec = re.search(rf'^\s*"{name}(>=[^"]+)",', text, re.M).group(1)
        assert "!=0.10.2" in spec and "!=0.11.0" in spec, (name, spec)
        assert importlib.metadata.version(name) not in ("0.10.2", "0.11.0")
