"""Which keys and values are secrets, how they are redacted, and how a launcher's tasks get
them back from the environment (never from run.yaml)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from omegaconf import OmegaConf

from cli.run import save_run_config
from lib.config.compose import compose, load_run_config
from lib.config.redact import (
    REDACTED,
    check_no_secret_outside_env,
    is_secret_key,
    mask,
    redact,
    redact_url,
    task_env,
)
from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ConfigError
from lib.core.paths import RunPaths

SECRET_NAMES = [
    "AWS_SECRET_ACCESS_KEY", "OPENAI_KEY", "HF_TOKEN", "WANDB_API_KEY", "PGPASSWORD",
    "DB_PASSWD", "GITHUB_AUTH", "GOOGLE_APPLICATION_CREDENTIALS", "MY_PASS", "SessionCookie",
    "api_key", "apiKey", "db_password", "hf_token", "access_key", "client_secret",
    "credentials", "ssh_passphrase", "auth",
]  # fmt: skip
NOT_SECRET_NAMES = [
    "max_tokens_per_batch", "max_num_batched_tokens", "token_filter", "keep_local",
    "sort_by_length", "role_key", "content_key", "think_key", "api_key_file", "author",
    "passage_field", "monkey", "WANDB_API_KEY_FILE", "SSH_AUTH_SOCK", "TOKENIZERS_PARALLELISM",
    "KEYBOARD_LAYOUT", "HF_HOME", "OMP_NUM_THREADS", "tokenize_batch_size",
]  # fmt: skip


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", NOT_SECRET_NAMES)
def test_names_that_are_not_secrets(name):
    assert not is_secret_key(name)


def _leaves(node, prefix=""):
    for f in dataclasses.fields(node):
        d = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(d):
            yield from _leaves(type(d), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_no_schema_key_is_taken_for_a_secret():
    """Tasks reload their config from run.yaml: a redacted schema value would break them."""
    assert [k for k in _leaves(EmbedfleetConfig) if is_secret_key(k.rsplit(".", 1)[-1])] == []
    plain = OmegaConf.to_container(compose(["+experiment=quickstart"]), resolve=False)
    assert plain == redact(plain)


def test_url_userinfo_is_redacted_in_values_and_text():
    assert redact_url("postgres://u:pw@h/db") == f"postgres://u:{REDACTED}@h/db"
    assert redact_url("x s3://me:p@ss@bucket/k y") == f"x s3://me:{REDACTED}@bucket/k y"
    assert redact_url("https://ghp_abc123@github.com/o/r") == f"https://{REDACTED}@github.com/o/r"
    for kept in ("s3://bucket/a@b", "sftp://me@host/data", "git@github.com:o/r", "no url"):
        assert redact_url(kept) == kept
    tree = {"cluster": {"env": {"DATABASE_URL": "postgres://u:pw@h/db", "OMP_NUM_THREADS": "2"}}}
    assert redact(tree)["cluster"]["env"] == {
        "DATABASE_URL": f"postgres://u:{REDACTED}@h/db",
        "OMP_NUM_THREADS": "2",
    }
    assert mask("token hf_abcdef in postgres://u:pw@h", ["hf_abcdef"]) == (
        f"token {REDACTED} in postgres://u:{REDACTED}@h"
    )


def test_a_secret_outside_cluster_env_is_refused_at_launch():
    plain = OmegaConf.to_container(
        compose(["+experiment=quickstart", "dataset.path=ftp://me:hunter2@host/d.parquet"]),
        resolve=False,
    )
    with pytest.raises(
        ConfigError,
        match=r"dataset\.path=ftp://me:\*\*\*REDACTED\*\*\*@host/d.parquet: .*cluster\.pass_env",
    ):
        check_no_secret_outside_env(plain)
    check_no_secret_outside_env({"cluster": {"env": {"HF_TOKEN": "x"}}})


def _cluster(**kw):
    return OmegaConf.create({"env": {}, "pass_env": [], "env_file": None, **kw})


def test_task_env_refuses_a_secret_literal_where_a_script_would_hold_it():
    cluster = _cluster(env={"WANDB_API_KEY": "k1234", "HF_HOME": "/hf"})
    with pytest.raises(
        ConfigError, match=r"cluster\.env\.WANDB_API_KEY .*pass_env=\[WANDB_API_KEY\].*env_file"
    ):
        task_env(cluster, literal_secrets=False, launcher="slurm", environ={})
    local = task_env(cluster, literal_secrets=True, launcher="local", environ={})
    assert local.plain == {"HF_HOME": "/hf"} and local.secret == {"WANDB_API_KEY": "k1234"}
    # The same value as this environment's variable (`${oc.env:...}`): forwarded by name.
    same = task_env(
        cluster, literal_secrets=False, launcher="slurm", environ={"WANDB_API_KEY": "k1234"}
    )
    assert same.forwarded == ["WANDB_API_KEY"] and same.plain == {"HF_HOME": "/hf"}


def test_task_env_reads_a_reloaded_secret_and_pass_env_from_the_environment():
    cluster = _cluster(env={"HF_TOKEN": REDACTED}, pass_env=["WANDB_API_KEY"])
    with pytest.raises(
        ConfigError,
        match="cluster.env.HF_TOKEN is a secret, which run.yaml does not keep: export HF_TOKEN",
    ):
        task_env(cluster, literal_secrets=True, launcher="local", environ={"WANDB_API_KEY": "w"})
    with pytest.raises(ConfigError, match="cluster.pass_env: WANDB_API_KEY is not set"):
        task_env(cluster, literal_secrets=True, launcher="local", environ={"HF_TOKEN": "h"})
    env = task_env(
        cluster,
        literal_secrets=False,
        launcher="slurm",
        environ={"HF_TOKEN": "h", "WANDB_API_KEY": "w"},
    )
    assert env.secret == {"HF_TOKEN": "h", "WANDB_API_KEY": "w"} and env.plain == {}
    assert sorted(env.forwarded) == ["HF_TOKEN", "WANDB_API_KEY"]
    dry = task_env(
        cluster, literal_secrets=False, launcher="slurm", environ={}, check_environ=False
    )
    assert sorted(dry.forwarded) == ["HF_TOKEN", "WANDB_API_KEY"] and dry.secret == {}


def test_a_task_gets_cluster_env_secrets_from_its_environment_not_run_yaml(tmp_path, monkeypatch):
    cfg = compose(["+experiment=quickstart", "+cluster.env.EF_TEST_TOKEN=tok-123456"])
    cfg.run.dir = str(tmp_path)
    save_run_config(tmp_path, cfg)
    assert "tok-123456" not in (tmp_path / "run.yaml").read_text()
    monkeypatch.setenv("EF_TEST_TOKEN", "tok-123456")
    assert load_run_config(RunPaths(tmp_path)).cluster.env.EF_TEST_TOKEN == "tok-123456"
    # A redacted value anywhere else cannot be restored: refused, naming the key.
    text = (tmp_path / "run.yaml").read_text().replace("builtin:stdlib_docstrings", f"'{REDACTED}'")
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"dataset\.path held a secret"):
        load_run_config(RunPaths(tmp_path))


def test_task_log_lines_mask_secrets(monkeypatch, capsys):
    from lib.runtime.logs import setup_logging

    monkeypatch.setenv("EF_TEST_API_KEY", "sk-live-98765")
    setup_logging("embed 0")
    try:
        logging.getLogger("t").error("key sk-live-98765, url postgres://u:pw@h/db")
        try:
            raise ValueError("boom sk-live-98765")
        except ValueError:
            logging.getLogger("t").exception("failed")
    finally:
        logging.basicConfig(force=True)
    err = capsys.readouterr().err
    assert "sk-live-98765" not in err and ":pw@" not in err
    assert f"ValueError: boom {REDACTED}" in err and f"postgres://u:{REDACTED}@h" in err


def test_env_file_is_sourced_for_launchers_without_a_shell(tmp_path):
    from lib.config.redact import env_file_values

    f = tmp_path / "keys.sh"
    f.write_text('export EF_TEST_API_KEY="k 123"\nEF_TEST_PLAIN=1\n')
    assert env_file_values(str(f)) == {"EF_TEST_API_KEY": "k 123", "EF_TEST_PLAIN": "1"}
    env = task_env(_cluster(env_file=str(f)), literal_secrets=False, launcher="slurm", environ={})
    assert env.env_file == str(f) and env.secret == {} and env.plain == {}
    with pytest.raises(ConfigError, match="cluster.env_file=.*missing.sh is not a file"):
        task_env(_cluster(env_file=str(tmp_path / "missing.sh")), literal_secrets=True,
                 launcher="local", environ={})  # fmt: skip
    (tmp_path / "bad.sh").write_text("exit_with_error_here_nonexistent_cmd_zz\n")
    with pytest.raises(ConfigError, match="sourcing it failed"):
        env_file_values(str(tmp_path / "bad.sh"))


def test_secret_overrides_of_a_command_line():
    from lib.config.redact import secret_overrides

    assert secret_overrides(
        ["+cluster.env.HF_TOKEN=x", "dataset.path=s3://a:b@c/d", "embed.max_tokens_per_batch=8",
         "cluster.pass_env=[HF_TOKEN]", "~cluster.env.OPENAI_KEY", "kmeans.seed=0,1"]
    ) == ["cluster.env.HF_TOKEN", "dataset.path"]  # fmt: skip
