# The two entry points of the README. Both set up ./.venv on a fresh machine first.
#   make demo   export HRNet_W18_C (offline weights), serve it on a local Triton server,
#               classify the sample photographs over HTTP and gRPC (DEMO_ARGS=--keep-serving)
#   make test   check the style and the layering (make lint), then run the test suite
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
OUT     ?= artifacts
SERVE_ENV ?= .venv-serve
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The nvidia-pytriton wheel of the one pinned Triton release (core/hrnet_core/release.py).
PYTRITON_VERSION := $(shell $(PYTHON) core/hrnet_core/release.py pytriton)

K8S_SCHEMAS ?= .cache/k8s-schemas

.PHONY: setup serve-env k8s-schemas demo lint test clean

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

# The environment Triton's Python backend runs the cpu-target models and hrnet_preprocess in:
# the stub of this Triton release returns empty outputs under numpy 2 (docs/repository.md), and
# OpenCV 4.11.0.86 is the last release built against numpy 1.x. hrnet_preprocess imports
# hrnet_core.preprocess itself, so the project is installed (editable, without its
# dependencies: those are the pins here) and the server runs the very code the client runs
# (docs/inputs.md). Rebuilt when this recipe or the project's packaging changes.
serve-env: $(SERVE_ENV)/.installed

$(SERVE_ENV)/.installed: Makefile pyproject.toml
	$(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_ENV)/bin/python -m pip install --quiet "numpy<2" "onnxruntime>=1.18" \
	  "opencv-python-headless==4.11.0.86" "imagesize>=1.4"
	$(SERVE_ENV)/bin/python -m pip install --quiet --no-deps -e .
	$(SERVE_ENV)/bin/python -c "import hrnet_core.preprocess"
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

test: setup serve-env k8s-schemas lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
