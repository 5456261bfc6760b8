# Quickstart: `make demo` (light runtime only) and `make test` (train + dev extras, whole suite).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test lint bench venv install-light install-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

venv: $(VENV)/bin/python

install-light: venv
	$(PIP) install -q -e .

install-dev: venv
	$(PIP) install -q -e ".[train,dev,dask]"

demo: install-light
	$(VENV)/bin/forest-inventory run sample_data/OSBS_029.tif --out out/demo

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) -m bench.run_all

clean:
	rm -rf out .pytest_cache .ruff_cache
