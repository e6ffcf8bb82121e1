# The two entry points of the README. Both set up ./.venv on a fresh machine first.
#   make demo   export HRNet_W18_C (offline weights), serve it on a local Triton server,
#               classify the sample photographs over HTTP and gRPC (DEMO_ARGS=--keep-serving)
#   make test   check the style and the layering (make lint), then run the test suite
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
OUT     ?= artifacts
SERVE_ENV ?= .venv-serve
TOOLS_ENV ?= .venv-tools
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The nvidia-pytriton wheel of the one pinned Triton release (core/hrnet_core/release.py).
PYTRITON_VERSION := $(shell $(PYTHON) core/hrnet_core/release.py pytriton)

K8S_SCHEMAS ?= .cache/k8s-schemas

.PHONY: setup serve-env tools-env k8s-schemas demo lint test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,client,loadtest,test]"
	# Test-only reference: PaddleClas's own HRNet (its pinned dependencies are not wanted).
	$(BIN)/python -m pip install --quiet --no-deps paddleclas==2.6.0
	# Only the tritonserver binary of this wheel is used; its own pins (numpy<2) are not wanted.
	$(BIN)/python -m pip install --quiet --no-deps nvidia-pytriton==$(PYTRITON_VERSION)
	touch $@

# The environment Triton's Python backend runs the cpu-target models and hrnet_preprocess in
# (OpenVINO by default, ONNX Runtime as an option: docs/cpu-speed.md):
# the stub of this Triton release returns empty outputs under numpy 2 (docs/repository.md), and
# OpenCV 4.11.0.86 is the last release built against numpy 1.x. hrnet_preprocess imports
# hrnet_core.preprocess itself, so the project is installed (editable, without its
# dependencies: those are the pins here) and the server runs the very code the client runs
# (docs/inputs.md). Rebuilt when this recipe or the project's packaging changes.
serve-env: $(SERVE_ENV)/.installed

$(SERVE_ENV)/.installed: Makefile pyproject.toml
	$(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_ENV)/bin/python -m pip install --quiet "numpy<2" "onnxruntime==1.32.0" "openvino==2026.4.1" \
	  "opencv-python-headless==4.11.0.86" "imagesize>=1.4"
	$(SERVE_ENV)/bin/python -m pip install --quiet --no-deps -e .
	$(SERVE_ENV)/bin/python -c "import hrnet_core.preprocess"
	touch $@

# NVIDIA's measuring tools, in an environment of their own (docs/bench.md): perf_analyzer and
# Model Analyzer. tritonclient 2.41.1 is the newest wheel on the registry that still carries the
# perf_analyzer binary (later ones dropped it, and the perf-analyzer project has no binary wheel
# here); its pins (numpy, protobuf, grpcio) must not meet the project's. The binary needs
# libb64 (Debian's libb64-0d, unpacked here with apt-get download: no root needed) and
# libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel; no GPU is needed); both are linked into
# lib/native, which hrnet_triton/tools.py puts on LD_LIBRARY_PATH. Without apt-get the binary
# cannot start and its tests are skipped, saying why.
tools-env: $(TOOLS_ENV)/.installed

$(TOOLS_ENV)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS_ENV)
	$(TOOLS_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_ENV)/bin/python -m pip install --quiet "tritonclient[all]==2.41.1" "triton-model-analyzer==1.58.0" \
	  "nvidia-cuda-runtime-cu12==12.9.79"
	rm -rf $(TOOLS_ENV)/lib/native && mkdir -p $(TOOLS_ENV)/lib/native
	ln -s "$$(cd $(TOOLS_ENV) && pwd)/$$($(TOOLS_ENV)/bin/python -c \
	  'import nvidia.cuda_runtime, os, sys; print(os.path.relpath(nvidia.cuda_runtime.__path__[0], sys.prefix))')/lib/libcudart.so.12" \
	  $(TOOLS_ENV)/lib/native/libcudart.so.12
	@if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  cd $(TOOLS_ENV)/lib/native && apt-get download -qq libb64-0d 2>/dev/null \
	  && dpkg-deb -x libb64-0d_*.deb deb && cp deb/usr/lib/x86_64-linux-gnu/libb64.so.0d . && rm -rf deb libb64-0d_*.deb \
	  || echo "tools-env: could not fetch libb64-0d; perf_analyzer will not start and its tests will be skipped"; \
	else echo "tools-env: no apt-get here; perf_analyzer needs libb64.so.0d in $(TOOLS_ENV)/lib/native"; fi
	touch $@

# The prometheus-operator's ServiceMonitor schema (tests/test_k8s.py validates k8s/ against it),
# from the npm registry; without node and npm its test is skipped with the reason.
k8s-schemas: $(K8S_SCHEMAS)/.installed

$(K8S_SCHEMAS)/.installed:
	@if command -v npm >/dev/null; then \
	  { npm install --prefix $(K8S_SCHEMAS) --no-audit --no-fund --loglevel=error @kubernetes-models/prometheus-operator@6.0.0 \
	    && touch $@; } || echo "k8s-schemas: npm install failed; the ServiceMonitor schema test will be skipped"; \
	else echo "k8s-schemas: no npm here; the ServiceMonitor schema test will be skipped"; fi

demo: setup serve-env
	$(BIN)/hrnet-triton demo --out $(OUT) $(DEMO_ARGS)

# The style and the layering: the formatter, the linter, and the import contracts of
# pyproject.toml (docs/architecture.md). Seconds; `make test` runs them first.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: setup serve-env tools-env k8s-schemas lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
