"""embed.append's plan (lib.embed.append): the existing shards keep their ranges and hash,
new rows become new shards after them, twice over; a shrunk dataset and another model
setting are refused with the reason. Planning only: no row is embedded here (the
embedding and merge are tests/e2e/test_dataset_features.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.run import save_run_config
from lib.config.compose import compose
from lib.core.errors import ConfigMismatchError, DatasetError
from lib.core.paths import RunPaths
from lib.embed.append import BASIS_KEY, RANGES_KEY, appends, apply_append, new_shard_count
from lib.embed.checks import FINGERPRINT_KEY
from lib.embed.plan import input_fingerprint
from lib.plan.registry import build_plan


def _write(path, n):
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(n)]}), path)


def _launch(tmp_path, data, *over):
    """Plan as launch_run does in append mode; save plan.json and run.yaml."""
    cfg = compose(
        [
            f"dataset.path={data}",
            "stages=[embed,merge]",
            f"run.root={tmp_path}",
            "run.name=r",
            "embed.num_shards=2",
            *over,
        ]
    )
    rows = pq.ParquetFile(data).metadata.num_rows
    paths = RunPaths(str(cfg.run.dir))
    plan = build_plan(cfg, rows)
    grown = apply_append(cfg, paths, plan, rows) if appends(cfg, paths) else False
    plan.extra[FINGERPRINT_KEY] = input_fingerprint(cfg)
    save_run_config(paths, cfg)
    plan.save(paths)
    return plan, grown


def test_new_shards_after_the_old_ones_twice_with_the_first_hash(tmp_path):
    data = tmp_path / "d.parquet"
    _write(data, 100)
    first, _ = _launch(tmp_path, data)
    h0 = first.stage("embed").config_hash
    _write(data, 130)
    plan, grown = _launch(tmp_path, data, "embed.append=true")
    embed = plan.stage("embed")
    assert grown and embed.config_hash == h0 and embed.num_tasks == 3
    assert plan.extra[RANGES_KEY] == [[0, 50], [50, 100], [100, 130]]
    assert plan.extra[BASIS_KEY]["rows"] == 100
    assert plan.stage("merge").config_hash != first.stage("merge").config_hash
    _write(data, 260)
    again, grown = _launch(tmp_path, data)  # an appended run dir stays in append mode
    assert grown and again.stage("embed").config_hash == h0
    assert again.extra[RANGES_KEY][:3] == [[0, 50], [50, 100], [100, 130]]
    # 130 new rows in shards of about the existing 43 (130 // 3): 3 more
    assert again.extra[RANGES_KEY][3:] == [[130, 174], [174, 217], [217, 260]]
    same, grown = _launch(tmp_path, data)
    assert not grown and same.stages == again.stages


def test_shrunk_dataset_and_changed_model_refused(tmp_path):
    data = tmp_path / "d.parquet"
    _write(data, 100)
    _launch(tmp_path, data)
    _write(data, 90)
    with pytest.raises(DatasetError, match="now has 90 rows to embed, fewer than the 100"):
        _launch(tmp_path, data, "embed.append=true")
    _write(data, 120)
    with pytest.raises(ConfigMismatchError, match=r"model.max_length: 256 -> 64"):
        _launch(tmp_path, data, "embed.append=true", "model.max_length=64")
    with pytest.raises(ConfigMismatchError, match=r"dataset.text_mode: 'field' -> 'template'"):
        _launch(tmp_path, data, "embed.append=true", "dataset.text_mode=template")


def test_a_new_run_dir_is_planned_as_usual(tmp_path):
    data = tmp_path / "d.parquet"
    _write(data, 10)
    plan, grown = _launch(tmp_path, data, "embed.append=true")
    assert not grown and RANGES_KEY not in plan.extra and plan.stage("embed").num_tasks == 2


def test_new_shard_count_follows_the_old_shard_size():
    assert new_shard_count(1000, 2, 500) == 1
    assert new_shard_count(1000, 4, 500) == 2
    assert new_shard_count(100, 2, 3) == 1
    assert new_shard_count(10, 10, 5) == 5
