# The two entry points of the README. Both set up ./.venv on a fresh machine first.
#   make demo   export HRNet_W18_C (offline weights) and classify the sample photographs
#   make test   run the test suite
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
OUT     ?= artifacts
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,test]"
	# Test-only reference: PaddleClas's own HRNet (its pinned dependencies are not wanted).
	$(BIN)/python -m pip install --quiet --no-deps paddleclas==2.6.0
	touch $@

demo: setup
	$(BIN)/hrnet-triton export HRNet_W18_C --weights offline --out $(OUT)/HRNet_W18_C.onnx
	$(BIN)/hrnet-triton classify --samples --onnx $(OUT)/HRNet_W18_C.onnx --top-k 3

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
