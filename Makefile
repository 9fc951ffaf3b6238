# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real data is never committed: a folder holding <dataset>.npz or medmnist/<dataset>.npz.
FEDGE_DATA_DIR ?= $(firstword $(abspath $(wildcard ../shared/data)) $(HOME)/.cache/fedge)
export FEDGE_DATA_DIR

.PHONY: install system-deps demo lint test test-fast clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[cpu,dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/fedge demo --dataset pneumoniamnist --data-dir "$(FEDGE_DATA_DIR)" --clients 4 --rounds 10 --report runs/demo/report.json

# Mosquitto, mosquitto_pub, dcmtk, chromium and chromium-driver for the integration tests (apt-get, only when missing).
system-deps:
	./scripts/system-deps.sh

# Lint and format check (ruff) and types (mypy) on the packages; configured in pyproject.toml (`ruff format` fixes the format).
lint: $(BIN)/.installed
	$(BIN)/ruff check fedge compression edge_client server exporters device_profiles benchmarks tests
	$(BIN)/ruff format --check fedge compression edge_client server exporters device_profiles benchmarks tests
	$(BIN)/mypy

test: $(BIN)/.installed system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The unit tests only (no broker, subprocess, federation or onnxruntime export): the inner loop,
# on two pytest-xdist workers (the suite is mostly import time; `make test` stays serial), with
# fewer Hypothesis examples per property than `make test` draws. Bytecode is cached even where the
# environment sets PYTHONDONTWRITEBYTECODE: recompiling the sources and re-rewriting the test
# modules' asserts costs each worker seconds on every run.
test-fast: $(BIN)/.installed
	PYTHONDONTWRITEBYTECODE= HYPOTHESIS_PROFILE=inner-loop $(BIN)/python -m pytest -q -p no:cacheprovider -m "not integration" -n 2 --dist worksteal

clean:
	rm -rf runs .pytest_cache
