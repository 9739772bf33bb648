"""The curation stages through launch.py: k-means levels as dependent distributed jobs,
then the curated subset; locally (1 and 2 ranks), killed and resumed, with bad input (on
the real test SLURM cluster: tests/slurm/test_curation.py).

The quickstart corpus is embedded once (a small slice); each run copies the finished
embed and merge stages into a fresh run dir, so only the k-means stages run again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.config.compose import compose
from lib.core.errors import EmbedfleetError
from lib.formats.arrays import load_npy, open_embeddings
from lib.plan.registry import build_plan
from lib.plan.spec import Plan
from tests.conftest import kill_task_when, run_launch, start_launch

pytestmark = pytest.mark.slow

CORPUS = [
    "+experiment=curation",
    "dataset.limit=120",
    "embed.num_shards=2",
    "embed.torch_threads=1",
    "model.max_length=96",
    "merge.by_source=false",
    "embed.device=cpu",  # pinned: the bit-exact resume checks hold on the CPU (fp32)
]
HIERARCHY = [
    "kmeans.n_clusters=[12,4]",
    "kmeans.n_resampling_steps=[3,1]",
    "kmeans.sample_size=[5,2]",
    "kmeans.n_iters=20",
    "curate.target_size=40",
    "kmeans.device=cpu",  # CUDA does not give bit-identical assignments run to run
]
STEP_FILES = ("centroids.npy", "assignment.npy", "members_offsets.npy", "members.npy")


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _failed(proc):
    assert proc.returncode != 0, f"expected a failure; stdout:\n{proc.stdout[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def embedded(shared_root) -> Path:
    """embed + merge of the slice, done once."""
    _ok(run_launch(*CORPUS, "stages=[embed,merge]", f"run.root={shared_root}", "run.name=km-base"))
    return shared_root / "km-base"


def fresh_run(embedded: Path, name: str) -> Path:
    """A new run dir holding only the finished embed and merge stages of ``embedded``."""
    run = embedded.parent / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for stage in ("embed", "merge"):
        shutil.copytree(embedded / stage, run / stage, ignore=shutil.ignore_patterns("attempts"))
    return run


def launch(run: Path, *extra: str, corpus: bool = True):
    args = [*(CORPUS if corpus else []), *HIERARCHY, *extra]
    return run_launch(*args, f"run.root={run.parent}", f"run.name={run.name}")


def kmeans_arrays(run: Path) -> dict[str, np.ndarray]:
    """Every published array of the k-means stages, by path."""
    return {
        str(p.relative_to(run)): np.asarray(load_npy(p))
        for p in sorted((run / "kmeans").rglob("*.npy"))
    }


def assert_same_results(a: Path, b: Path) -> None:
    one, two = kmeans_arrays(a), kmeans_arrays(b)
    assert one.keys() == two.keys() and len(one) > 10
    for key in one:
        if "centroids" in key:
            np.testing.assert_allclose(one[key], two[key], rtol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(one[key], two[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(embedded) -> tuple[Path, str]:
    """The 2-level hierarchy with one rank per level (the local reference run)."""
    run = fresh_run(embedded, "km-ref")
    proc = _ok(launch(run))
    return run, proc.stdout


def test_two_levels_end_to_end(reference, corpus_table):
    run, stdout = reference
    plan = Plan.load(run)
    assert [s.name for s in plan.stages] == [
        "embed",
        "merge",
        "kmeans_level1",
        "kmeans_level2",
        "curate",
    ]
    assert "embed: all 2 task(s) already complete" in stdout
    for level, k in ((1, 12), (2, 4)):
        spec = plan.stage(f"kmeans_level{level}")
        assert (spec.group, spec.job, spec.stage_dir, spec.kind) == (
            "kmeans",
            "jobs.kmeans",
            f"kmeans/level{level}",
            "distributed",
        )
        assert spec.depends_on == (("merge",) if level == 1 else ("kmeans_level1",))
        final = json.loads((run / f"kmeans/level{level}/final.json").read_text())
        assert final["n_clusters"] == k
        assert f"k-means L{level}" in stdout and f"-> {k} clusters" in stdout
        marker = json.loads((run / f"kmeans/level{level}/completions/task_00000.json").read_text())
        assert marker["config_hash"] == spec.config_hash
        steps = [f"step{s}" for s in range(3 if level == 1 else 1)]
        assert final["step"] == steps[-1]
        for step in steps:
            d = run / f"kmeans/level{level}/{step}"
            assert (d / "completions/task_00000.json").exists()
            for name in STEP_FILES:
                sidecar = json.loads((d / f"{name}.json").read_text())
                assert sidecar["shape"] == list(np.load(d / name, mmap_mode="r").shape)
    emb = np.asarray(open_embeddings(run / "merge/embeddings.safetensors"))
    level1 = run / "kmeans/level1/step2"
    assert np.load(level1 / "assignment.npy").shape == (len(emb),)
    assert np.load(run / "kmeans/level2/step0/assignment.npy").shape == (12,)

    cur = run / "kmeans/curated"
    rows = np.load(cur / "embedding_rows.npy")
    assert len(rows) == 40 == len(np.unique(rows))
    assert json.loads((cur / "embedding_rows.npy.json").read_text())["shape"] == [40]
    assert "curated        40 rows (40 distinct)" in stdout
    table = pq.read_table(cur / "metadata.parquet")
    assert table.num_rows == 40
    assert {"row_index", "id", "source", "embedding_row"} <= set(table.column_names)
    np.testing.assert_array_equal(table.column("embedding_row").to_numpy(), rows)
    np.testing.assert_array_equal(
        np.load(cur / "dataset_rows.npy"), table.column("row_index").to_numpy()
    )
    # every curated row traces back to its dataset row
    original = table.column("row_index").to_pylist()
    corpus = corpus_table.take(pa.array(original))
    assert table.column("id").to_pylist() == corpus.column("id").to_pylist()
    assert table.column("source").to_pylist() == corpus.column("source").to_pylist()
    merged_meta = pq.read_table(run / "merge/metadata.parquet")
    assert merged_meta.column("row_index").take(pa.array(rows)).to_pylist() == original
    assert (run / "kmeans/curated/completions/task_00000.json").exists()


def test_relaunch_skips_finished_levels(reference):
    run, _ = reference
    stamps = {p: p.stat().st_mtime_ns for p in (run / "kmeans").rglob("*.npy")}
    again = _ok(launch(run))
    for stage in ("kmeans_level1", "kmeans_level2", "curate"):
        assert f"{stage}: all 1 task(s) already complete" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "kmeans").rglob("*.npy")} == stamps


def test_two_ranks_equal_one(embedded, reference):
    run = fresh_run(embedded, "km-ws2")
    proc = _ok(launch(run, "kmeans.world_size=2"))
    assert (
        "[kmeans_level1 r1]" in proc.stdout
        or (run / "kmeans/level1/logs/task_00000.rank1.log").exists()
    )
    for level in (1, 2):
        log = (run / f"kmeans/level{level}/logs/task_00000.rank1.log").read_text()
        assert f"kmeans_level{level} 0 r1" in log
        marker = json.loads(
            (run / f"kmeans/level{level}/step0/completions/task_00000.json").read_text()
        )
        assert marker["extra"]["world_size"] == 2
    assert_same_results(reference[0], run)


# -- kill and resume: a synthetic matrix large enough that a level takes seconds ---------
SYNTHETIC = [
    "stages=[kmeans,curate]",
    "kmeans.n_clusters=[60,6]",
    "kmeans.n_resampling_steps=[3,1]",
    "kmeans.sample_size=[40,3]",
    "kmeans.n_iters=30",
    "curate.target_size=500",
    "kmeans.device=cpu",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, 16)).astype(np.float32)
    x = centers[rng.integers(0, 200, 16000)] + 0.8 * rng.normal(size=(16000, 16))
    path = tmp_path_factory.mktemp("syn") / "embeddings.npy"
    np.save(path, x.astype(np.float32))
    return path


def launch_synthetic(run: Path, embeddings: Path, *extra: str, popen: bool = False):
    args = [
        *SYNTHETIC,
        f"kmeans.embeddings_path={embeddings}",
        *extra,
        f"run.root={run.parent}",
        f"run.name={run.name}",
    ]
    return start_launch(*args) if popen else run_launch(*args)


def test_kill_mid_level_then_relaunch_equals_uninterrupted(synthetic, shared_root):
    killed = shared_root / "km-killed"
    proc = launch_synthetic(killed, synthetic, popen=True)
    step0 = killed / "kmeans/level1/step0/completions/task_00000.json"
    attempt = killed / "kmeans/level1/attempts/task_00000.json"
    try:
        pid = kill_task_when(proc, attempt, step0.exists, timeout=300)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert pid is not None, f"level 1 step 0 never finished:\n{out[-3000:]}"
    assert proc.returncode != 0
    assert "kmeans_level1 0] FAILED (killed by SIGKILL)" in out
    level = killed / "kmeans/level1"
    assert not (level / "final.json").exists(), "the kill came too late: level 1 had finished"
    assert not (level / "completions").exists()
    assert not (killed / "kmeans/level2").exists()

    resumed = _ok(launch_synthetic(killed, synthetic))
    assert "k-means level 1 step0 is complete, skipping" in resumed.stdout
    clean = shared_root / "km-clean"
    _ok(launch_synthetic(clean, synthetic))
    one, two = kmeans_arrays(killed), kmeans_arrays(clean)
    assert one.keys() == two.keys() and "kmeans/curated/embedding_rows.npy" in one
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    # an external matrix has no row metadata: only the embedding rows are curated
    assert not (killed / "kmeans/curated/metadata.parquet").exists()


# -- bad input ----------------------------------------------------------------------------
def _plan_error(*overrides: str) -> str:
    """The error of composing (the launch check) or planning ``overrides``."""
    with pytest.raises(EmbedfleetError) as info:
        build_plan(compose(["+experiment=curation", *HIERARCHY, *overrides]), 120)
    return str(info.value)


def test_bad_settings_fail_at_launch(tmp_path):
    assert "kmeans.sample_size[0] must be >= 1, got 0" in _plan_error("kmeans.sample_size=[0,2]")
    assert "kmeans.n_clusters has 2 entries [12, 4] but n_levels=3" in _plan_error(
        "kmeans.n_levels=3"
    )
    assert "kmeans.sample_size has 3 entries" in _plan_error("kmeans.sample_size=[5,2,2]")
    assert "kmeans.n_clusters[0]=500 is larger than the 120 rows" in _plan_error(
        "kmeans.n_clusters=[500,4]"
    )
    assert "curate.target_size=1000 is more than the 120 rows" in _plan_error(
        "curate.target_size=1000"
    )
    assert "does not exist" in _plan_error(f"kmeans.embeddings_path={tmp_path / 'none.npy'}")
    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    assert "must be 2-D" in _plan_error(f"kmeans.embeddings_path={tmp_path / 'flat.npy'}")
    assert "backend=faiss runs in one process" in _plan_error(
        "kmeans.backend=faiss", "kmeans.world_size=2"
    )
    # through launch.py: the message, a non-zero exit, nothing run or planned
    run = tmp_path / "bad"
    text = _failed(launch(run, "kmeans.n_clusters=[500,4]"))
    assert "error: kmeans.n_clusters[0]=500 is larger than the 120 rows" in text
    assert not (run / "plan.json").exists() and not (run / "kmeans").exists()


def test_more_clusters_than_embedded_rows_fails_before_a_level_marker(embedded):
    run = fresh_run(embedded, "km-toomany")
    rows = int(open_embeddings(run / "merge/embeddings.safetensors").shape[0])
    assert rows < 120  # the length filter dropped rows: the plan's bound passes
    text = _failed(launch(run, "kmeans.n_clusters=[119,4]"))
    assert f"n_clusters=119 is larger than the number of points ({rows} rows" in text
    assert not (run / "kmeans/level1/completions").exists()
    assert not (run / "kmeans/level1/final.json").exists()
    assert not list((run / "kmeans").rglob("*.npy"))


def test_nan_rows_fail_with_their_row_numbers(tmp_path):
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    x[[3, 77]] = np.nan
    np.save(tmp_path / "nan.npy", x)
    run = tmp_path / "nan-run"
    text = _failed(
        run_launch(
            "stages=[kmeans,curate]",
            f"kmeans.embeddings_path={tmp_path / 'nan.npy'}",
            "kmeans.n_clusters=[10,2]",
            "curate.target_size=20",
            f"run.root={tmp_path}",
            "run.name=nan-run",
        )
    )
    assert "2 rows contain NaN or Inf (rows [3, 77])" in text
    assert not list((run / "kmeans").rglob("completions/*.json"))
    assert not list((run / "kmeans").rglob("*.npy"))
