"""sync.sources parsing, the launch check, and the stage's plan and config hash."""

from __future__ import annotations

import pytest

from lib.config.compose import compose
from lib.core.errors import ConfigError
from lib.plan.registry import build_plan
from lib.sync.params import parse_sources, source_problems

BASE = {"address": "h.example.org", "username": "me", "remote_dir": "/data", "key_file": "/k"}


def test_list_and_mapping_forms_sorted_by_name_with_glob_alias():
    as_list = parse_sources(
        [{**BASE, "name": "zeta", "glob": "a*.pkl"}, {**BASE, "name": "alpha", "patterns": ["b/*"]}]
    )
    as_map = parse_sources(
        {"zeta": {**BASE, "glob": "a*.pkl"}, "alpha": {**BASE, "patterns": ["b/*"]}}
    )
    assert [s.name for s in as_list] == ["alpha", "zeta"] == [s.name for s in as_map]
    assert as_list[1].patterns == ["a*.pkl"] and as_list[0].patterns == ["b/*"]
    assert as_list == as_map


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"password": "hunter2-x"}, "password_env=VARIABLE"),
        ({"pasword_env": "X"}, "unknown keys ['pasword_env']"),
        ({"name": "completions"}, "not one of"),
        ({"name": "a/b"}, "a source name is its directory"),
        ({"glob": "../etc/*"}, "without '..'"),
        ({"remote_dir": ""}, "remote_dir is not set"),
        ({"address": None}, "address is not set"),
        ({"port": 70000}, "port must be in 1..65535"),
    ],
)
def test_bad_sources_are_refused_naming_the_key_and_the_fix(change, expect):
    source = {**BASE, "name": "h1", "glob": "*.pkl", **change}
    with pytest.raises(ConfigError, match="sync.sources") as err:
        parse_sources([source])
    assert expect in str(err.value)
    assert "hunter2-x" not in str(err.value)


def test_repeated_names_and_no_patterns_are_refused():
    with pytest.raises(ConfigError, match="repeated"):
        parse_sources([{**BASE, "name": "a", "glob": "x"}, {**BASE, "name": "a", "glob": "y"}])
    with pytest.raises(ConfigError, match="no patterns"):
        parse_sources([{**BASE, "name": "a"}])


def test_launch_check_refuses_a_literal_password_without_quoting_it():
    problems = source_problems(
        {"sources": [{**BASE, "name": "a", "glob": "x", "password": "pw-77z"}]}
    )
    assert len(problems) == 1 and "credentials_file" in problems[0] and "pw-77z" not in problems[0]
    with pytest.raises(ConfigError, match="password_env"):
        compose(
            [
                "stages=[sync]",
                "sync.sources=[{name: a, address: h, remote_dir: /d, glob: x, password: pw-77z}]",
            ]
        )


def _sync_spec(*overrides):
    cfg = compose(["stages=[sync]", *overrides])
    (spec,) = build_plan(cfg, 0).stages
    return spec


def test_plan_one_task_per_source_and_hash_ignores_how_to_log_in():
    two = "sync.sources=[{name: b, address: h2, remote_dir: /d, glob: x, key_file: /k1}, {name: a, address: h1, remote_dir: /d, glob: x, agent: true}]"
    spec = _sync_spec(two)
    assert (spec.name, spec.kind, spec.num_tasks, spec.stage_dir, spec.depends_on) == (
        "sync", "array", 2, "sync", ()
    )  # fmt: skip
    other_login = two.replace("key_file: /k1", "password_env: PW").replace(
        "agent: true", "credentials_file: /c"
    )
    assert _sync_spec(other_login, "sync.parallel_files=9").config_hash == spec.config_hash
    assert _sync_spec(two.replace("glob: x", "glob: y", 1)).config_hash != spec.config_hash


def test_sync_without_sources_says_where_to_describe_them():
    with pytest.raises(ConfigError, match="sync=NAME"):
        _sync_spec()
    assert _sync_spec("sync=example_two_clusters").num_tasks == 2
