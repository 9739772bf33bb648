"""Whole pipelines on ``cluster=hosts`` (2 real namespace sshd hosts, n1 and n2, one slot
each) give the same bytes as the local launcher's run of the same config:

- curation: merge -> k-means levels (distributed: 2 ranks, one per host, gloo rendezvous
  at the first host's address, the same port for both levels) -> curate -> metrics, in
  the foreground (``--attach``), from a copy of an embed stage run once locally (embed on
  hosts vs local: tests/hosts/test_multihost.py). The local reference runs the k-means
  levels with the same world size (2 local ranks): the rank count changes the reduction
  order of the centroid sums, so only equal world sizes are compared byte for byte
  (tests/e2e/test_curation.py checks 2 ranks against 1 within 1e-6). Every array and
  parquet file is compared by sha256; the JSON summaries by content without their wall
  times and with the run's own path replaced.
- curation with ``cluster.multihost.storage=sync`` (each host its own workdir and run dir,
  the k-means ranks on n1, which has 2 slots): what the launcher pulled back equals the
  local run's the same way (the summaries name the host's run dir, replaced too).
- curation on ``cluster=tpu_vm`` (3 workers, n1..n3, through the real gcloud CLI against
  tests/hosts/fake_tpu_api.py, as in tests/hosts/test_gcloud_cli.py): with the run dir
  shared (a k-means level's 2 ranks on 2 workers, one slot each), and with storage=sync
  (each worker its own workdir, ``cluster.multihost.workdir=.../w{worker}``, 2 slots a
  worker so a level's ranks share one; the rsync and SFTP copies over the ssh gcloud
  prints for each worker): the same bytes as the local run.
- extract: 2 tasks of the tiny random Qwen2 of tests/e2e/test_extract.py, one per host,
  detached (the default: the launch returns once the tasks run, ``wait`` blocks until
  done): every shard, each task's metadata.json and the merged one byte-identical to the
  local run's.

n3 is left alone on cluster=hosts (tests/hosts/test_multihost.py cuts it off for a while);
the TPU runs use it as worker 2 and assert nothing about which workers ran what (a worker
cut off leaves the pool, its tasks run on the others, the bytes are the same). The hosts
share this machine's filesystem, so the run dir is at the same path on every host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_launch
from tests.e2e.test_extract import _args as extract_args
from tests.hosts.conftest import TpuNode, fake_tpu, gcloud_env, tpu_overrides
from tests.unit.extract.helpers import texts, tiny_qwen2, write_jsonl

pytestmark = pytest.mark.slow

HOSTS = ("n1", "n2")
# OpenBLAS chooses its kernels by CPU unless OPENBLAS_CORETYPE names them (some machine
# images set it, this one to Haswell); tasks started by the hosts' sshd do not inherit
# this environment, and another kernel rounds matrix products (k-means) differently: every
# run, local too, gets the same.
SAME_BLAS = [
    f"+cluster.env.{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE",) if os.environ.get(k)
]
THREADS = ["+cluster.env.OMP_NUM_THREADS=1", "+cluster.env.MKL_NUM_THREADS=1", *SAME_BLAS]
CURATION = [
    "+experiment=curation",
    "dataset.limit=120",
    "embed.num_shards=1",
    "embed.torch_threads=1",
    "embed.device=cpu",
    "model.max_length=96",
    "merge.by_source=false",
    "kmeans.n_clusters=[12,4]",
    "kmeans.n_resampling_steps=[3,1]",
    "kmeans.sample_size=[5,2]",
    "kmeans.n_iters=20",
    "kmeans.device=cpu",
    "kmeans.world_size=2",
    "curate.target_size=40",
    "metrics.levels=[2]",
    *THREADS,
]
PIPELINE = "stages=[embed,merge,kmeans,curate,metrics]"
# What the stages publish (not who ran them, their logs or their markers).
BOOKKEEPING = ("attempts", "logs", "completions")
CHECKPOINT = re.compile(r"shard_\d+\.json")  # an extract shard's marker: its task's cpu time
SUMMARIES = {"final.json", "metrics.json"}  # they name their run dir and hold wall times
TIMINGS = {"seconds", "timings_s"}


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns(HOSTS)


def _hosts_args(ns) -> list[str]:
    env = ns.env
    items = ", ".join(
        f"{{address: {env[f'EF_HOST_{h}']}, port: {ns.port}, name: {h}}}" for h in HOSTS
    )
    return [
        "cluster=hosts",
        f"cluster.hosts=[{items}]",
        f"cluster.multihost.user={env['EF_NS_USER']}",
        f"cluster.multihost.key_file={ns.key}",
        f"cluster.multihost.known_hosts={ns.known_hosts}",
        "cluster.multihost.connect_timeout_s=5",
        "cluster.multihost.poll_s=0.5",
    ]


def _outputs(run: Path, *under: str, copies: tuple[Path, ...] = ()) -> dict[str, object]:
    """What ``run`` published under each of ``under``, by path: a file's sha256, or for a
    k-means level's final.json and the metrics' metrics.json their content without the
    wall times and with the run's own path and name replaced (and the paths ``copies``,
    the hosts' run dirs under storage=sync, where those files were written)."""
    out: dict[str, object] = {}
    for top in under:
        for p in sorted((run / top).rglob("*")):
            rel = p.relative_to(run)
            if not p.is_file() or set(rel.parts) & set(BOOKKEEPING) or CHECKPOINT.match(p.name):
                continue
            if p.name in SUMMARIES:
                text = p.read_text()
                for where in (*copies, run):
                    text = text.replace(str(where), "<run>")
                text = text.replace(run.name, "<name>")
                out[str(rel)] = _without(json.loads(text), TIMINGS)
            else:
                out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _without(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _attempt(run: Path, stage_dir: str, task: int = 0) -> dict:
    return json.loads((run / stage_dir / "attempts" / f"task_{task:05d}.json").read_text())


def _hosts_of(run: Path, stage_dir: str) -> set[str]:
    """The hosts that the attempt records of a stage's tasks name (every rank's)."""
    hosts = set()
    for rec in (run / stage_dir / "attempts").glob("task_*.json"):
        hosts |= {p["host"] for p in json.loads(rec.read_text())["placements"]}
    return hosts


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipelines-on-hosts")


@pytest.fixture(scope="module")
def embedded(root) -> Path:
    """The slice's embed stage, run once locally; both curation runs start from a copy
    (embed on hosts equals local: tests/hosts/test_multihost.py)."""
    _ok(run_launch(*CURATION, "stages=[embed]", f"run.root={root}", "run.name=cur-embed"))
    return root / "cur-embed"


def _from_embedded(embedded: Path, name: str) -> Path:
    run = embedded.parent / name
    run.mkdir()
    shutil.copytree(embedded / "embed", run / "embed", ignore=shutil.ignore_patterns("attempts"))
    return run


@pytest.fixture(scope="module")
def curation_local(root, embedded) -> Path:
    """The local launcher's run of the curation slice (2 local ranks per k-means level)."""
    run = _from_embedded(embedded, "cur-local")
    proc = _ok(run_launch(*CURATION, PIPELINE, f"run.root={root}", f"run.name={run.name}"))
    assert "embed: all 1 task(s) already complete" in proc.stdout, proc.stdout[-3000:]
    return run


def test_curation_on_two_hosts_equals_local(ns, root, embedded, curation_local):
    run = _from_embedded(embedded, "cur-hosts")
    proc = _ok(
        run_launch(
            "--attach",
            *CURATION,
            PIPELINE,
            *_hosts_args(ns),
            f"run.root={root}",
            "run.name=cur-hosts",
        )
    )
    assert "complete in " in proc.stdout, proc.stdout[-3000:]
    # both ranks of each level ran, one on each host, meeting at the first one's address
    for level in (1, 2):
        log = (run / f"kmeans/level{level}/logs/task_00000.rank1.log").read_text()
        assert f"kmeans_level{level} 0 r1" in log
        assert _hosts_of(run, f"kmeans/level{level}") == set(HOSTS)
    ports = {_attempt(run, f"kmeans/level{lv}")["master_port"] for lv in (1, 2)}
    assert len(ports) == 1 and None not in ports, ports  # one rendezvous port per run
    got = _outputs(run, "merge", "kmeans", "metrics")
    want = _outputs(curation_local, "merge", "kmeans", "metrics")
    arrays = [k for k in want if k.startswith("kmeans/") and k.endswith(".npy")]
    assert "kmeans/curated/embedding_rows.npy" in arrays and len(arrays) > 15, sorted(want)
    assert "merge/embeddings.safetensors" in want
    assert any(k.startswith("metrics/level2/") for k in want), sorted(want)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert "<run>" in json.dumps(want["kmeans/level1/final.json"])  # it names its input


def test_curation_storage_sync_equals_local(ns, root, embedded, curation_local):
    """The same pipeline with storage=sync: n1 (2 slots: a k-means level's ranks share one
    host there) and n2 with workdirs of their own. Every stage's outputs come back into
    the local run dir, byte-identical to the local launcher's; a k-means level brings its
    earlier steps too (the level marker lists their markers), each step marker as on the
    host."""
    dirs = {"n1": root / "sync-n1", "n2": root / "sync-n2"}
    items = ", ".join(
        f"{{address: {ns.env[f'EF_HOST_{h}']}, port: {ns.port}, name: {h}, workdir: {d}"
        + (", slots: 2}" if h == "n1" else "}")
        for h, d in dirs.items()
    )
    run = _from_embedded(embedded, "cur-sync")
    proc = _ok(
        run_launch(
            "--attach",
            *CURATION,
            PIPELINE,
            *(a for a in _hosts_args(ns) if not a.startswith("cluster.hosts=")),
            f"cluster.hosts=[{items}]",
            "cluster.multihost.storage=sync",
            "cluster.multihost.code_sync=rsync",
            f"run.root={root}",
            f"run.name={run.name}",
            timeout=900,
        )
    )
    assert "complete in " in proc.stdout, proc.stdout[-3000:]
    remote = {h: d / "runs" / run.name for h, d in dirs.items()}
    for level in (1, 2):
        assert _hosts_of(run, f"kmeans/level{level}") == {"n1"}
    level1 = json.loads((run / "kmeans/level1/completions/task_00000.json").read_text())
    steps = [f"kmeans/level1/step{s}/completions/task_00000.json" for s in range(3)]
    assert level1["checkpoints"] == steps
    for name in steps:
        assert (run / name).read_bytes() == (remote["n1"] / name).read_bytes()
    got = _outputs(run, "merge", "kmeans", "metrics", copies=tuple(remote.values()))
    want = _outputs(curation_local, "merge", "kmeans", "metrics")
    assert "kmeans/level1/step0/centroids.npy" in want and "kmeans/curated/metadata.parquet" in want
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []


# -- curation on cluster=tpu_vm -----------------------------------------------------------

TPU = "ef-tpu3"
WORKERS = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def tpu_env(ns, tmp_path_factory):
    """The fake TPU API with ef-tpu3 (workers n1, n2, n3) and the environment that points
    the launches' gcloud at it (this process keeps its own HOME: its model cache)."""
    ns.need_ns(WORKERS)
    base = tmp_path_factory.mktemp("gcloud")
    with fake_tpu(ns, base, {TPU: TpuNode("4545", WORKERS)}, patch_env=False) as api:
        yield gcloud_env(api, base)


def _on_tpu(ns, tpu_env, root: Path, run: Path, *extra: str):
    return _ok(
        run_launch(
            "--attach",
            *CURATION,
            PIPELINE,
            *tpu_overrides(ns, TPU),
            "cluster.multihost.poll_s=1",
            *extra,
            f"run.root={root}",
            f"run.name={run.name}",
            env=tpu_env,
            timeout=900,
        )
    )


def test_curation_on_three_tpu_workers_equals_local(ns, tpu_env, root, embedded, curation_local):
    """Shared run dir: each k-means level's 2 ranks on 2 workers (one slot each), meeting
    at the first one's address; every output as the local run's."""
    run = _from_embedded(embedded, "cur-tpu")
    proc = _on_tpu(ns, tpu_env, root, run)
    assert "tpu_vm: " in proc.stdout and "complete in " in proc.stdout, proc.stdout[-3000:]
    workers = {f"{TPU}/w{i}" for i in range(len(WORKERS))}
    for level in (1, 2):
        log = (run / f"kmeans/level{level}/logs/task_00000.rank1.log").read_text()
        assert f"kmeans_level{level} 0 r1" in log
        placed = [p["host"] for p in _attempt(run, f"kmeans/level{level}")["placements"]]
        assert len(set(placed)) == 2 and set(placed) <= workers, placed
    got = _outputs(run, "merge", "kmeans", "metrics")
    want = _outputs(curation_local, "merge", "kmeans", "metrics")
    assert "kmeans/curated/embedding_rows.npy" in want and "merge/embeddings.safetensors" in want
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []


def test_curation_on_tpu_workers_storage_sync_equals_local(
    ns, tpu_env, root, embedded, curation_local
):
    """storage=sync: each worker its own workdir and run dir (``{worker}`` in the
    workdir), the code rsync'ed there, 2 slots a worker (a level's ranks on one; CPU
    stages, so clear_accelerator_holders=false): what the launcher pulled back over SFTP
    equals the local run's outputs; the level's step markers are the host's."""
    run = _from_embedded(embedded, "cur-tpu-sync")
    homes = [root / f"tpu-sync-w{i}" for i in range(len(WORKERS))]
    proc = _on_tpu(
        ns,
        tpu_env,
        root,
        run,
        "cluster.multihost.storage=sync",
        "cluster.multihost.code_sync=rsync",
        f"cluster.multihost.workdir='{root}/tpu-sync-w{{worker}}'",  # quoted: Hydra's braces
        "cluster.tpu_vm.slots=2",
        "cluster.tpu_vm.clear_accelerator_holders=false",
    )
    assert "complete in " in proc.stdout, proc.stdout[-3000:]
    remote = {f"{TPU}/w{i}": d / "runs" / run.name for i, d in enumerate(homes)}
    for level in (1, 2):
        placed = {p["host"] for p in _attempt(run, f"kmeans/level{level}")["placements"]}
        assert len(placed) == 1 and placed <= set(remote), placed
    (where,) = {p["host"] for p in _attempt(run, "kmeans/level1")["placements"]}
    steps = [f"kmeans/level1/step{s}/completions/task_00000.json" for s in range(3)]
    for name in steps:
        assert (run / name).read_bytes() == (remote[where] / name).read_bytes()
    got = _outputs(run, "merge", "kmeans", "metrics", copies=tuple(remote.values()))
    want = _outputs(curation_local, "merge", "kmeans", "metrics")
    assert "kmeans/level1/step0/centroids.npy" in want and "kmeans/curated/metadata.parquet" in want
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []


# -- extract ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extract_inputs(root) -> tuple[Path, Path]:
    d = root / "extract-inputs"
    d.mkdir()
    model, data = tiny_qwen2(d, layers=6), write_jsonl(d / "docs.jsonl", texts(24))
    for p in (d, *d.rglob("*")):  # the remote user reads them (root here, but say it)
        p.chmod(0o755 if p.is_dir() else 0o644)
    return model, data


def _extract_args(inputs, *extra: str) -> list[str]:
    # The settings of tests/e2e/test_extract.py's runs (its local-launcher parallelism is
    # ignored by the hosts launcher), single-threaded here.
    model, data = inputs
    return extract_args((None, model, data), *THREADS, *extra)


@pytest.fixture(scope="module")
def extract_local(root, extract_inputs) -> Path:
    _ok(run_launch(*_extract_args(extract_inputs), f"run.root={root}", "run.name=ex-local"))
    return root / "ex-local"


def test_extract_on_two_hosts_equals_local(ns, root, extract_inputs, extract_local):
    run = root / "ex-hosts"
    launched = _ok(
        run_launch(
            *_extract_args(extract_inputs),
            *_hosts_args(ns),
            f"run.root={root}",
            "run.name=ex-hosts",
        )
    )
    assert "detached: the scheduler" in launched.stdout, launched.stdout
    _ok(run_launch("wait", str(run), "--interval", "0.5", "--timeout", "600"))
    assert _hosts_of(run, "extract") == set(HOSTS)
    want = _outputs(extract_local, "extract")
    shards = [k for k in want if k.endswith(".zst")]
    assert len(shards) > 2 and {k.split("/")[1] for k in shards} == {"task_00000", "task_00001"}
    got = _outputs(run, "extract")
    assert got.keys() == want.keys()
    assert "extract/metadata.json" in want
    assert [k for k in want if got[k] != want[k]] == []
