"""The index stage under SLURM: one single-task job after merge, with its own resources
(``cluster.slurm.resources.index``); the rendered script pinned by a golden file."""

from __future__ import annotations

from launchers.slurm.launcher import SlurmLauncher
from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.core.repo import REPO_ROOT
from lib.plan.registry import build_plan
from tests.unit.launchers.test_slurm_render import check_golden


def _cfg(root: str):
    return compose(
        [
            "+experiment=quickstart",
            "cluster=slurm",
            "cluster.python=/opt/py/bin/python",
            "cluster.slurm.max_array_size=1000",
            "cluster.slurm.resources.index.mem=64G",
            "cluster.slurm.resources.index.cpus_per_task=16",
            "cluster.slurm.resources.index.time=04:00:00",
            "stages=[merge,index]",
            f"run.root={root}",
            "run.name=q",
        ]
    )


def test_index_is_one_job_after_merge_and_its_script_is_golden():
    cfg = _cfg("/runs")
    plan = build_plan(cfg, 0)
    merge, index = plan.stages
    assert merge.name == "merge"
    assert (index.name, index.kind, index.num_tasks, index.depends_on) == (
        "index",
        "single",
        1,
        ("merge",),
    )
    assert index.command("python", "/runs/q")[:3] == ["python", "-m", "jobs.index"]
    _, text = SlurmLauncher(cfg)._script(RunPaths("/runs/q"), index, 0, [0], 2)
    check_golden("index.sbatch", text.replace(str(REPO_ROOT), "/src/embedfleet"))
    assert "#SBATCH --mem=64G" in text and "#SBATCH --array=0\n" in text


def test_the_dry_run_submits_index_after_merge(tmp_path, capsys):
    cfg = _cfg(str(tmp_path))
    plan = build_plan(cfg, 0)
    SlurmLauncher(cfg).launch(RunPaths(tmp_path / "q"), plan, dry_run=True)
    out = capsys.readouterr().out
    assert "merge: would submit 1 job: <merge-1>" in out
    assert "index: would submit 1 job: <index-2>, after <merge-1>" in out
    assert "sbatch --parsable '--dependency=afterany:<merge-1>'" in out
