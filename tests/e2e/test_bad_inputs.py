"""Bad input at launch, end to end through launch.py (issue 19): each is refused before
anything is written, with the key and the rule: keys added with a typo and ``+``, values
out of range, a first stage whose input stage is not complete, URLs no file system
serves (and their passwords kept out of the messages), run names that leave run.root;
and the command line itself (no arguments, an unknown command)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.run import save_run_config
from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.plan.registry import build_plan
from tests.conftest import run_launch

ROWS = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 24-row parquet dataset: row counting and fingerprinting take no time."""
    path = tmp_path_factory.mktemp("data") / "tiny.parquet"
    texts = [f"row {i}: a short sentence about topic {i % 5}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)], "text": texts}), path)
    return path


def _base(tiny: Path, root: Path, name: str = "run") -> list[str]:
    return [
        "+experiment=quickstart",
        f"dataset.path={tiny}",
        "embed.num_shards=2",
        "merge.by_source=false",
        f"run.root={root}",
        f"run.name={name}",
    ]


def _refused(proc, code: int = 2) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"rc {proc.returncode}, expected {code}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return out


def _nothing_written(root: Path) -> None:
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    assert written == [], written


# ------------------------------------------------------------- keys and values at launch


def test_a_typo_added_with_plus_is_refused_with_the_valid_keys(tiny, tmp_path):
    root = tmp_path / "runs"
    out = _refused(run_launch(*_base(tiny, root), "+embed.bach_size=3"))
    assert "unknown key embed.bach_size" in out
    assert "valid keys under embed:" in out and "batch_size" in out
    out = _refused(run_launch(*_base(tiny, root), "+frobnicate=1"))
    assert "unknown key frobnicate" in out and "valid keys under the top level:" in out
    _nothing_written(root)


def test_values_out_of_range_are_refused_with_the_range(tiny, tmp_path):
    root = tmp_path / "runs"
    out = _refused(
        run_launch(
            *_base(tiny, root),
            "model.max_length=0",
            "embed.batch_size=0",
            "embed.max_tokens_per_batch=0",
            "cluster.parallelism=0",
            "dataset.limit=-3",
            "kmeans.n_clusters=[10,0]",
            "embed.vllm.gpu_memory_utilization=1.5",
        )
    )
    for line in (
        "model.max_length must be >= 1, got 0",
        "embed.batch_size must be >= 1, got 0",
        "embed.max_tokens_per_batch must be >= 1, got 0",
        "cluster.parallelism must be >= 1, got 0",
        "dataset.limit must be >= 1, got -3",
        "kmeans.n_clusters[1] must be >= 1, got 0",
        "embed.vllm.gpu_memory_utilization must be > 0 and <= 1, got 1.5",
    ):
        assert line in out, out
    _nothing_written(root)


def test_a_sweep_point_out_of_range_refuses_the_whole_sweep(tiny, tmp_path):
    root = tmp_path / "runs"
    out = _refused(run_launch("-m", *_base(tiny, root, "sw"), "dataset.limit=10,-3"))
    assert "dataset.limit must be >= 1, got -3" in out and "sweep point" in out
    _nothing_written(root)


def test_a_sweep_still_gets_one_run_dir_per_point(tiny, tmp_path):
    root = tmp_path / "runs"
    proc = run_launch("-m", *_base(tiny, root, "sw"), "dataset.limit=10,12", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = sorted(str(p.parent.relative_to(root / "sw")) for p in root.rglob("launch.log"))
    assert len(jobs) == 2 and jobs[0].startswith("dataset.limit=10,"), jobs
    assert jobs[1].startswith("dataset.limit=12,"), jobs


# ------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", ["../escaped", "/ABS", "", "a/./b"])
def test_run_names_outside_run_root_are_refused_with_the_rule(tiny, tmp_path, name):
    root = tmp_path / "runs"
    if name == "/ABS":
        name = str(tmp_path / "abs")
    out = _refused(run_launch(*_base(tiny, root, name)))
    assert f"run.name={name!r} is refused" in out
    assert "a run name is a relative path of one or more components" in out
    _nothing_written(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "written beside run.root"


def test_a_nested_run_name_is_a_run_dir_under_run_root(tiny, tmp_path):
    root = tmp_path / "runs"
    proc = run_launch(*_base(tiny, root, "group/one"), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"run dir: {root / 'group' / 'one'}" in proc.stdout


# ------------------------------------------------------------- URLs and their passwords


@pytest.mark.parametrize("key", ["run.root", "dataset.path"])
def test_a_protocol_no_file_system_serves_names_the_installed_ones(tiny, tmp_path, key):
    root = tmp_path / "runs"
    url = "foo://alice:hunter2secret@host/x.parquet"
    args = [a for a in _base(tiny, root) if not a.startswith(f"{key}=")]
    out = _refused(run_launch(*args, f"{key}={url}"))
    assert (
        f"{key}=foo://alice:***REDACTED***@host/x.parquet: no fsspec file system serves foo://"
        in out
    )
    installed = out.split("installed protocols: ", 1)[1]
    assert "file" in installed and "memory" in installed
    assert "hunter2secret" not in out
    _nothing_written(root)


def test_a_password_in_a_url_is_never_echoed(tiny, tmp_path):
    proc = run_launch(*_base(tiny, tmp_path / "runs"), "run.root=s3://al:pw@bucket/runs")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert ":pw@" not in out and "al:***REDACTED***@bucket" in out


# ------------------------------------------------- a first stage whose input is missing


def _earlier_launch(tiny: Path, root: Path) -> RunPaths:
    """A run dir as a launch of stages=[embed,merge] leaves it before any task finished."""
    cfg = compose(_base(tiny, root))
    paths = RunPaths(str(cfg.run.dir))
    save_run_config(paths, cfg)
    build_plan(cfg, ROWS).save(paths)
    return paths


def test_merge_alone_without_embed_outputs_is_refused_before_anything_is_written(tiny, tmp_path):
    root = tmp_path / "runs"
    paths = _earlier_launch(tiny, root)
    run = Path(paths.root)
    before = {n: (run / n).read_bytes() for n in ("run.yaml", "plan.json")}
    out = _refused(run_launch(*_base(tiny, root), "stages=[merge]"), code=1)
    assert "stages=[merge]: merge reads the outputs of stage 'embed'" in out
    assert "2 of its 2 task(s) have no completion marker" in out
    assert "launch with stages=[embed,merge]" in out
    assert {n: (run / n).read_bytes() for n in before} == before
    assert not (run / "merge").exists() and not (run / "embed").exists()


@pytest.mark.slow
def test_merge_alone_merges_the_complete_embed_outputs_of_the_run_dir(tiny, tmp_path):
    root = tmp_path / "runs"
    first = run_launch(*_base(tiny, root), "stages=[embed]")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    proc = run_launch(*_base(tiny, root), "stages=[merge]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "embed: all 2 task(s) already complete" in proc.stdout
    assert (root / "run" / "merge" / "embeddings.safetensors").exists()


# ------------------------------------------------------------------ the command line


def test_no_arguments_prints_the_usage_and_the_experiments(tmp_path):
    proc = run_launch(cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "+experiment=NAME" in proc.stdout
    for name in ("quickstart", "curation", "full_v2", "wikipedia"):
        assert f"  {name} " in proc.stdout
    assert "quickstart: stdlib docstrings x all-MiniLM-L6-v2 on this machine" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no run started


def test_an_unknown_command_lists_the_commands(tmp_path):
    out = _refused(run_launch("frobnicate", cwd=tmp_path, timeout=60))
    assert "unknown command 'frobnicate'" in out
    assert "commands: status, wait, logs, retry, cancel, verify" in out
    assert list(tmp_path.iterdir()) == []
