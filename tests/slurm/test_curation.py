"""The curation stages on the real test SLURM cluster: one sbatch job per level, chained,
2 ranks per level, equal to the local run."""

from __future__ import annotations

import pytest

from tests.e2e.test_curation import (  # noqa: F401 (module fixtures used below)
    _ok,
    assert_same_results,
    embedded,
    fresh_run,
    launch,
    reference,
)
from tests.slurm.test_launcher import wait_run


@pytest.mark.slurm
def test_two_levels_on_slurm_equal_local(slurm_cluster, embedded, reference):  # noqa: F811

    run = fresh_run(embedded, "km-slurm")
    proc = _ok(launch(run, "cluster=slurm", "kmeans.world_size=2"))
    assert "embed: complete" in proc.stdout and "merge: complete" in proc.stdout
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines() if ": submitted" in line}
    assert set(lines) == {"kmeans_level1", "kmeans_level2", "curate"}
    level1_job = lines["kmeans_level1"].split("submitted 1 job: ")[1].split(",")[0].strip()
    assert lines["kmeans_level2"].endswith(f"after {level1_job}")
    status = wait_run(run, timeout=600)
    assert "all stages complete" in status, status
    for level in (1, 2):
        script = (run / "slurm").glob(f"kmeans_level{level}-*.sbatch")
        text = next(script).read_text()
        assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --nodes=1" in text
        for rank in (0, 1):
            log = (run / f"kmeans/level{level}/logs/task_00000.rank{rank}.log").read_text()
            assert f"kmeans_level{level} 0 r{rank}" in log
    assert_same_results(reference[0], run)
