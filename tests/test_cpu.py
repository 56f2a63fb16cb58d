"""Host-process settings for the CPU (``jaxcnn.train.cpu``): measured by what the kernel reports."""

import os
import subprocess
import sys

import jax
import pytest

from jaxcnn.train.cpu import glibc_malloc

# A jitted program whose temporary (the sorted copy, 72 MB) is larger than a glibc thread arena's
# heap (64 MB): glibc maps it fresh with mmap on every call unless keep_host_memory() came first.
_PROGRAM = """
import argparse, resource, sys
from jaxcnn.experiments.cli import add_host_memory_flag, prepare_host
from jaxcnn.train import keep_host_memory
applied = None
if sys.argv[1] == "keep":
    applied = keep_host_memory()
elif sys.argv[1].startswith("cli"):  # what the CLIs do first: --keep_host_memory is on unless turned off
    p = argparse.ArgumentParser()
    add_host_memory_flag(p)
    prepare_host(p.parse_args(sys.argv[2:]))
import jax, jax.numpy as jnp
x = jnp.ones((2, 9_000_000), jnp.float32)
f = jax.jit(lambda x: jnp.sort(x * 2, axis=0)[0, ::1000].sum())
for _ in range(4):  # the heap grows to its working size
    f(x).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))  # the quietest call: a busy machine can make the heap grow once more
"""


def _faults_per_call(mode: str, *flags: str):
    """(what keep_host_memory() returned, the fewest page faults of six calls)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode, *flags], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not glibc_malloc(), reason="glibc's malloc")
def test_keep_host_memory_stops_the_page_faults_of_every_step():
    applied, faults = _faults_per_call("default")
    assert applied == "None" and faults > 10_000  # 72 MB of fresh pages on every call (4 KiB each)
    applied, faults = _faults_per_call("keep")
    assert applied == "True" and faults < 500  # the same pages reused


@pytest.mark.skipif(not glibc_malloc(), reason="glibc's malloc")
def test_the_clis_keep_host_memory_unless_told_not_to():
    assert _faults_per_call("cli")[1] < 500
    assert _faults_per_call("cli", "--no-keep_host_memory")[1] > 10_000


def test_keep_host_memory_refuses_once_jax_started():
    from jaxcnn.train import keep_host_memory

    jax.devices()  # this process's backend has started
    if glibc_malloc():
        with pytest.raises(RuntimeError, match=r"keep_host_memory\(\): JAX already started; call it before"):
            keep_host_memory()
    else:
        assert keep_host_memory() is False
