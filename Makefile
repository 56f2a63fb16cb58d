# Two commands do all the set-up on a fresh machine with only Python 3.10+:
#   make demo   # create .venv, install jaxcnn, run the main job on the embedded offline data
#   make test   # create .venv, install jaxcnn[test,export] and jax2onnx, run the fast test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv demo test test-slow bench clean

venv: $(VENV)/.installed

# jax2onnx (python -m jaxcnn.export) is installed with --no-deps: it declares orbax-checkpoint<0.11.37,
# which conflicts with jaxcnn's orbax-checkpoint>=0.12.8 (pip cannot resolve both), and it runs
# without that pin; the export extra has the packages it does need. Python >= 3.11 only (on 3.10 the
# export's tests are skipped).
# `pip install -e .` compiles the oneDNN kernels (jaxcnn/kernels/: scikit-build-core, CMake, g++); a
# change to their source installs again.
$(VENV)/.installed: pyproject.toml jaxcnn/kernels/CMakeLists.txt jaxcnn/kernels/onednn_conv.cc
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export]'
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		$(BIN)/python -m pip install --quiet --no-deps jax2onnx==0.17.1; fi
	touch $@

demo: venv
	$(BIN)/python -m jaxcnn.experiments.cifar10 --dataset offline --preset demo $(DEMO_ARGS)

# pytest exits 5 when it collects no test: say so, and fail (an empty suite is never a pass).
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; fi; exit $$rc

test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; fi; exit $$rc

bench: venv
	$(BIN)/python -m benchmarks.layers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
