# Developer entry points. `make install` sets up .venv with everything the tests need.
# TORCH picks the torch build: the default is the CPU wheel that lies on these machines' disk;
# on your own machine use e.g. `make install TORCH=torch` (or any CUDA build you prefer).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-fast lint format demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,data,ray]"

# The embedded demo: SmolLM2-135M + three LoRA specialists (evoforge demo prepare), evolved on this machine.
demo: install
	$(BIN)/evoforge demo prepare
	$(BIN)/evoforge run recipes/demo.yaml --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

# The whole suite (what CI runs); test-fast leaves out the end-to-end tests marked `slow` (whole runs, the real
# demo, seed merges against stock mergekit), for a quick check while editing.
test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint:
	$(BIN)/ruff check evoforge tests scripts bench
	$(BIN)/ruff format --check evoforge tests scripts bench

format:
	$(BIN)/ruff format evoforge tests scripts bench
	$(BIN)/ruff check --fix evoforge tests scripts bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
