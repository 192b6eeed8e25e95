# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs, writes the demo federation, runs LOCO for mdmt and stl_prognosis
#   make test   installs if needed, runs the linters (make lint), then the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_WS ?= runs/demo
DEMO_FED ?= runs/demo-federation
DEMO_SCALE ?= 0.12
DEMO_DICOM_SIZE ?= 160

.PHONY: install demo lint test clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m mdmt.ops.flwr_app  # Flower never installs dependencies per run in this environment
	touch $(STAMP)

install: $(STAMP)

$(DEMO_FED)/synth.json: | $(STAMP)
	$(BIN)/mdmt synth $(DEMO_FED) --scale $(DEMO_SCALE) --image-size $(DEMO_DICOM_SIZE) --seed 0

demo: $(STAMP) $(DEMO_FED)/synth.json
	$(BIN)/mdmt loco --config simulations/demo.toml --fed $(DEMO_FED) --workspace $(DEMO_WS)

# ruff (lint + format) and the layer contracts (import-linter on the installed layout; see tests/layers.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tests/layers.py

# TEST_WORKERS=N spreads the test files over N pytest-xdist workers, a file at a time, longest first
# (tests/conftest.py). The default, 0, is one process: on 2 cores two workers cut pytest from 56 to 44
# minutes, but under that load a site missed the deployment test's 90 s round timeout, SecAgg+ rounds
# timed out, and two workers shared torch.compile's cache (docs/performance.md, "The test suite").
TEST_WORKERS ?= 0
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

clean-demo:
	rm -rf $(DEMO_WS) $(DEMO_FED)
