# embedfleet: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU wheel of torch; anything looser lets pip pull a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS := quickstart,remote,tracking,dev

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := true

.PHONY: install demo test lint bench clean help

help:
	@echo "make demo     install, then run the quickstart (stdlib docstrings x all-MiniLM-L6-v2)"
	@echo "make test     install, then run the whole test suite"
	@echo "make install  create $(VENV) with every dependency"
	@echo "make lint     ruff check + format check"
	@echo "make bench    run the benchmarks in bench/ (slow; results in BENCHMARKS.md)"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q ".[$(EXTRAS)]" "$(TORCH)"
	touch $(STAMP)

demo: install
	$(PY) launch.py +experiment=quickstart

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_merge.py

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
