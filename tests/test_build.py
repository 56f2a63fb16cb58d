"""The package's own build: the oneDNN kernels are compiled where they can be and used by default,
and where they cannot (no compiler) the package still builds, installs and trains on XLA's path,
saying so in one line."""

import os
import platform
import shutil
import subprocess
import sys
import zipfile

import pytest

from jaxcnn import kernels
from jaxcnn.kernels import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAN_BUILD = sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("g++") is not None
MISSING_LINE = "jaxcnn: convolutions run on XLA's path: the oneDNN kernels are not available"


@pytest.mark.skipif(not CAN_BUILD, reason="the kernels build on Linux x86-64 with g++ only")
def test_where_a_compiler_exists_the_installed_package_has_its_kernels_and_uses_them():
    assert onednn.load() is not None, onednn.unavailable_reason()
    assert onednn.load().version()[:2] == (3, 2)
    if os.environ.get("JAXCNN_KERNELS", "auto") == "auto":
        assert kernels.choose("float32") == ("onednn", None)


def test_without_a_compiler_the_wheel_builds_without_the_kernels(tmp_path):
    """``CXX=false``: CMake finds no working C++ compiler; the wheel is pure Python and the build says why."""
    pytest.importorskip("scikit_build_core")
    env = {**os.environ, "CXX": "false"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                          str(tmp_path), ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = " ".join((out.stdout + out.stderr).split())
    assert "jaxcnn: the oneDNN kernels are not built (no working C++ compiler); jaxcnn installs on XLA's path" in log
    (wheel,) = tmp_path.glob("jaxcnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxcnn/layers.py" in names and "jaxcnn/kernels/__init__.py" in names
    assert not [n for n in names if "_onednn" in n], names


_NO_KERNELS = """
import importlib.abc, runpy, sys
class NoKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jaxcnn.kernels._onednn":
            raise ImportError("no module named jaxcnn.kernels._onednn (hidden by the test)")
sys.meta_path.insert(0, NoKernels())
sys.argv[0] = "cifar10"
runpy.run_module("jaxcnn.experiments.cifar10", run_name="__main__")
"""


def test_a_run_without_the_kernels_trains_on_xla_and_says_so_once(tmp_path):
    env = {**os.environ, "JAXCNN_KERNELS": "auto", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _NO_KERNELS, "--dataset", "offline", "--preset", "smoke",
                          "--epochs", "1", "--no_progress", "--workdir", str(tmp_path / "run")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if MISSING_LINE in line]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "hidden by the test" in lines[0]
    assert (tmp_path / "run" / "summary.json").exists()
