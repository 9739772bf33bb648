"""The report stage under SLURM: one single-task job after every other stage, with its own
resources (``cluster.slurm.resources.report``)."""

from __future__ import annotations

from launchers.slurm.launcher import SlurmLauncher
from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.plan.registry import build_plan


def _cfg(root: str):
    return compose(
        [
            "+experiment=quickstart",
            "cluster=slurm",
            "cluster.python=/opt/py/bin/python",
            "cluster.slurm.resources.report.mem=8G",
            "cluster.slurm.resources.report.time=00:30:00",
            "stages=[embed,merge,report]",
            f"run.root={root}",
            "run.name=q",
        ]
    )


def test_report_is_one_job_with_its_resources(tmp_path):
    cfg = _cfg(str(tmp_path))
    report = build_plan(cfg, 100).stages[-1]
    assert (report.name, report.kind, report.num_tasks) == ("report", "single", 1)
    _, text = SlurmLauncher(cfg)._script(RunPaths(tmp_path / "q"), report, 0, [0], 3)
    assert "#SBATCH --mem=8G" in text and "#SBATCH --time=00:30:00" in text
    assert "-m jobs.report" in text


def test_the_dry_run_submits_the_report_after_the_other_stages(tmp_path, capsys):
    cfg = _cfg(str(tmp_path))
    SlurmLauncher(cfg).launch(RunPaths(tmp_path / "q"), build_plan(cfg, 100), dry_run=True)
    out = capsys.readouterr().out
    assert "report: would submit 1 job: <report-3>, after <embed-1>, <merge-2>" in out
