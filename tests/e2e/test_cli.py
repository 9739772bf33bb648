"""launch.py end to end on the config: dry runs that plan offline, sweeps."""

import pytest
from omegaconf import OmegaConf

from lib.config.compose import compose, load_run_config
from lib.core.paths import RunPaths
from tests.conftest import run_launch


def test_dry_run_plans_offline_from_declared_size(tmp_path):
    proc = run_launch("+experiment=full_v2", f"run.root={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "embed: would run tasks 0-63 of 64" in proc.stdout
    assert "planning for 2268178 rows" in proc.stderr
    assert not (tmp_path / "full_v2" / "run.yaml").exists()
    assert OmegaConf.is_config(compose(["+experiment=full_v2"]))


@pytest.mark.slow
def test_multirun_gives_each_sweep_point_its_own_run_dir(tmp_path):
    proc = run_launch(
        "-m",
        "+experiment=quickstart",
        f"run.root={tmp_path}",
        "run.name=sweep",
        "dataset.limit=20,30",
        "embed.num_shards=1",
        "merge.by_source=false",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("sweep/*/run.yaml"))
    assert len(runs) == 2
    rows = sorted(load_run_config(RunPaths(r)).dataset.limit for r in runs)
    assert rows == [20, 30]
    for r in runs:
        assert (r / "merge" / "embeddings.safetensors").exists()
