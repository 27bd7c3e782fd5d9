# One entry point per job. Each target creates the environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
PIP_FLAGS ?= --quiet --disable-pip-version-check
MODEL_DIR ?= models/cifar10-lt-ride4
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: help dev serve-env serve test test-containers lint format train-demo bench bench-serve wrk clean

help:
	@echo "make serve       install the service (onnxruntime, no torch) and serve $(MODEL_DIR) on $(HOST):$(PORT)"
	@echo "make test        install everything (torch CPU, onnxruntime, service, dev tools) and run lint + tests"
	@echo "make test-containers  the container tests: images built, compose stack up (minutes; CI runs them too)"
	@echo "make train-demo  train a small RIDE model on CIFAR-10-LT for 2 epochs (runs/demo)"
	@echo "make bench       run the benchmarks in bench/ (they print; they are not tests); installs wrk if missing"
	@echo "make bench-serve only the serving benchmark (raw cascade and server, float32 and int8)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[train,serve,dev]'
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(SERVE_VENV)/bin/pip install $(PIP_FLAGS) -e '.[serve,cpu]'
	touch $@

dev: $(VENV)/.installed

serve-env: $(SERVE_VENV)/.installed

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m service --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every test but the container tests, which take minutes on their own: `make test-containers` (CI runs both).
test: lint
	$(VENV)/bin/python -m pytest -q -m "not containers"

test-containers: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m containers

train-demo: $(VENV)/.installed
	$(VENV)/bin/python -m training.run train --config configs/cifar10_lt_ride3.toml --set schedule.epochs=2 --out runs/demo

bench: $(VENV)/.installed wrk
	$(VENV)/bin/python bench/train_throughput.py
	$(VENV)/bin/python bench/serve_load.py
	$(VENV)/bin/python bench/batch_requests.py

bench-serve: $(VENV)/.installed wrk
	$(VENV)/bin/python bench/serve_load.py

# The serving benchmark's load generator (Debian/Ubuntu package `wrk`): apt-get as root, else through sudo.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends wrk; }; }

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache
