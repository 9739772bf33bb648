"""Outputs that no longer match their markers, through launch.py: every consumer
invalidates the marker (moved aside with the reason) so that rerunning the same command
redoes the task; ``launch.py verify`` re-hashes everything; every file a task publishes is
named by a marker; stale temporaries of a killed task are removed; a config mismatch
always says what changed.

The whole curation pipeline (embed -> merge -> kmeans -> curate -> metrics) runs once on a
small jsonl slice of the quickstart corpus; each test works on a copy of that run dir.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from lib.core.paths import RunPaths
from lib.core.storage import LocalStorage
from lib.plan.spec import Plan
from tests.conftest import run_launch

pytestmark = pytest.mark.slow

PIPELINE = [
    "+experiment=curation",
    "stages=[embed,merge,kmeans,curate,metrics]",
    "dataset.text_field=text",
    "dataset.id_field=id",
    "dataset.source_field=source",
    "embed.num_shards=2",
    "embed.torch_threads=1",
    "model.max_length=64",
    "kmeans.n_clusters=[3,2]",
    "kmeans.n_resampling_steps=[2,1]",
    "kmeans.sample_size=[3,2]",
    "curate.target_size=8",
]
# Not outputs of a task: who ran it, its logs, its markers (live or invalidated).
BOOKKEEPING = ("/completions/", "/attempts/", "/logs/")


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _failed(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure; output:\n{out[-4000:]}"
    return out


def _is_marker(name: str) -> bool:
    """A live task or checkpoint marker (an embed shard's part, a k-means step)."""
    return (
        re.fullmatch(r"(.+/)?completions/task_\d+\.json|embed/parts/.+/part_\d+\.json", name)
        is not None
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_last_byte(path: Path) -> None:
    """Corrupt ``path`` in place: same size, other content (only sha256 can tell)."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_table) -> Path:
    """24 short rows of the real corpus, from several sources, as a jsonl file."""
    rows = [r for r in corpus_table.to_pylist() if len(r["text"]) < 200][:24]
    assert len({r["source"] for r in rows}) > 1
    path = tmp_path_factory.mktemp("integrity-data") / "slice.jsonl"
    path.write_text(
        "".join(json.dumps({k: r[k] for k in ("id", "source", "text")}) + "\n" for r in rows)
    )
    return path


def launch(run: Path, dataset: Path, *extra: str):
    return run_launch(
        *PIPELINE,
        f"dataset.path={dataset}",
        *extra,
        f"run.root={run.parent}",
        f"run.name={run.name}",
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset) -> Path:
    run = tmp_path_factory.mktemp("integrity-runs") / "base"
    _ok(launch(run, dataset))
    return run


def copy_run(finished: Path, name: str, *, only: tuple[str, ...] | None = None) -> Path:
    """A copy of the finished run (or of some of its stage dirs only)."""
    run = finished.parent / name
    shutil.rmtree(run, ignore_errors=True)
    if only is None:
        shutil.copytree(finished, run, ignore=shutil.ignore_patterns("attempts", "launcher.lock"))
    else:
        run.mkdir()
        for stage in only:
            shutil.copytree(
                finished / stage, run / stage, ignore=shutil.ignore_patterns("attempts")
            )
    return run


def invalidated(run: Path, marker: str) -> list[dict]:
    """The records of ``marker`` moved aside (``RunPaths.invalid_marker``)."""
    name = RunPaths.marker(marker, 0) if "/completions/" not in marker else marker
    head, _, base = name.rpartition("/")
    stem = base.removesuffix(".json")
    return [json.loads(p.read_text()) for p in sorted((run / head / "invalid").glob(f"{stem}.*"))]


def test_every_published_file_is_named_by_a_marker(finished):
    """Each stage dir's files (less bookkeeping) are outputs of one of its markers:
    merge/by_source/* too, so deleting or truncating one is noticed."""
    plan = Plan.load(finished)
    storage = LocalStorage(finished)
    assert {s.stage_dir for s in plan.stages} >= {
        "embed",
        "merge",
        "kmeans/level1",
        "kmeans/level2",
        "kmeans/curated",
        "metrics/level1",
        "metrics/level2",
    }
    for spec in plan.stages:
        listing = storage.list(spec.stage_dir)
        named = set()
        for name in listing:
            if _is_marker(name):
                named |= {o["path"] for o in json.loads((finished / name).read_text())["outputs"]}
        published = {n for n in listing if not any(b in f"/{n}" for b in BOOKKEEPING)}
        assert published, spec.name
        assert published - named == set(), f"{spec.name}: files no marker names"
        assert named <= set(listing), f"{spec.name}: markers name files that do not exist"
    assert any(n.startswith("merge/by_source/") for n in storage.list("merge"))


def test_a_deleted_source_split_and_stale_temporaries_are_redone(finished, dataset):
    run = copy_run(finished, "by-source")
    split = sorted((run / "merge" / "by_source").glob("*/embeddings.safetensors"))[0]
    want = _sha(split)
    split.unlink()
    stale = [
        run / "merge" / "embeddings.safetensors.tmp-0123456789ab",  # merge killed mid-write
        split.parent / "metadata.parquet.tmp-0123456789ab",
    ]
    for p in stale:
        p.write_bytes(b"half-written")
    sibling = run / "embed" / "shards" / "shard_00001.parquet.tmp-0123456789ab"
    sibling.write_bytes(b"another task's, still writing")
    proc = _ok(launch(run, dataset))
    assert "merge: running 1 task(s)" in proc.stdout  # not "already complete"
    assert _sha(split) == want
    assert not any(p.exists() for p in stale)
    assert sibling.exists()  # only a task's own temporaries, and embed did not run


def test_a_shard_corrupted_in_place_invalidates_its_marker_and_the_rerun_redoes_it(
    finished, dataset
):
    run = copy_run(finished, "corrupt-shard", only=("embed",))
    shard = run / "embed" / "shards" / "shard_00000.safetensors"
    want = _sha(shard)
    _flip_last_byte(shard)
    out = _failed(launch(run, dataset, "stages=[embed,merge]"))
    assert "sha256" in out and "shard_00000.safetensors" in out
    assert "marker invalidated; rerun the same command to redo task 0 of embed" in out
    assert not (run / RunPaths.marker("embed", 0)).exists()
    (record,) = invalidated(run, "embed")
    assert "sha256" in record["reason"] and record["content"]["task"] == 0
    assert (run / RunPaths.marker("embed", 1)).exists()  # the intact shard is kept
    assert not (run / "merge" / "embeddings.safetensors").exists()
    _ok(launch(run, dataset, "stages=[embed,merge]"))
    assert _sha(shard) == want
    assert _sha(run / "merge" / "embeddings.safetensors") == _sha(
        finished / "merge" / "embeddings.safetensors"
    )


@pytest.mark.parametrize(
    ("corrupt", "rerun", "stage_dir", "redo"),
    [
        # k-means level 1 reads the merged embeddings
        ("merge/embeddings.safetensors", "kmeans/level1", "merge", "task 0 of merge"),
        # curate reads every level's final step
        (
            "kmeans/level2/step0/members.npy",
            "kmeans/curated",
            "kmeans/level2",
            "task 0 of kmeans_level2",
        ),
        # metrics reads the levels' assignments
        (
            "kmeans/level1/step1/assignment.npy",
            "metrics/level1",
            "kmeans/level1",
            "task 0 of kmeans_level1",
        ),
    ],
)
def test_every_consumer_invalidates_a_changed_input(
    finished, dataset, corrupt, rerun, stage_dir, redo
):
    run = copy_run(finished, "consumer-" + rerun.replace("/", "-"))
    want = _sha(run / corrupt)
    _flip_last_byte(run / corrupt)
    (run / RunPaths.marker(rerun, 0)).unlink()  # the consumer has to run again
    out = _failed(launch(run, dataset))
    assert f"{corrupt}: sha256" in out
    assert f"marker invalidated; rerun the same command to redo {redo}" in out
    assert not (run / RunPaths.marker(stage_dir, 0)).exists()
    assert len(invalidated(run, stage_dir)) == 1
    _ok(launch(run, dataset))
    assert _sha(run / corrupt) == want  # redone, deterministically
    assert (run / RunPaths.marker(rerun, 0)).exists()


def test_verify_rehashes_every_marker_and_invalidates_the_broken(finished, dataset):
    run = copy_run(finished, "verify")
    proc = _ok(run_launch("verify", str(run)))
    assert "verify: all" in proc.stdout and "match their outputs" in proc.stdout
    split = sorted((run / "merge" / "by_source").glob("*/metadata.parquet"))[0]
    step = run / "kmeans" / "level1" / "step1" / "centroids.npy"  # level 1's final step
    want = {p: _sha(p) for p in (split, step)}
    for p in want:
        _flip_last_byte(p)
    proc = run_launch("verify", str(run))
    out = _failed(proc)
    assert f"{split.relative_to(run)}: sha256" in out
    assert f"{step.relative_to(run)}: sha256" in out
    assert re.search(r"^merge +0 ok, 1 invalidated$", out, re.M)
    assert re.search(r"^embed +2 ok$", out, re.M)
    assert not (run / RunPaths.marker("merge", 0)).exists()
    assert not (run / RunPaths.marker("kmeans/level1", 0)).exists()
    assert not (run / RunPaths.marker("kmeans/level1/step1", 0)).exists()  # same files
    assert invalidated(run, "kmeans/level1/step1")
    # Nothing broken is left: verify passes, and says which tasks are to be redone.
    proc = _ok(run_launch("verify", str(run)))
    assert "2 task(s) have no marker yet" in proc.stdout
    _ok(launch(run, dataset))
    assert {p: _sha(p) for p in want} == want
    _ok(run_launch("verify", str(run)))


def test_a_config_mismatch_always_names_what_changed(finished, dataset):
    """Without the old run.yaml the keys cannot be compared; plan.json still tells the row
    count; without either, the stage whose hash differs and what that hash covers."""
    run = copy_run(finished, "mismatch")
    (run / "run.yaml").unlink()
    out = _failed(launch(run, dataset, "dataset.limit=20"))
    assert "different configuration" in out
    assert "dataset rows: 24 -> 20" in out
    assert "embed config hash:" in out
    (run / "plan.json").unlink()
    out = _failed(launch(run, dataset, "dataset.limit=20"))
    assert "changed since that run" in out
    assert "embed: its markers carry config hash" in out and "dataset.*" in out
