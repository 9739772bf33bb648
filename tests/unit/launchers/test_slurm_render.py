"""Pure rendering of sbatch scripts: golden files, quoting, resource validation."""

import os
import subprocess

import pytest

from launchers.slurm.queue import chunk_tasks, parse_array_id, scrubbed_env, scrubbed_environ
from launchers.slurm.render import (
    job_name,
    quote,
    render_array_script,
    render_distributed_script,
    sbatch_lines,
)
from launchers.slurm.resources import merged_resources
from lib.config.compose import compose
from lib.core.errors import ConfigError
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden"
RES = {
    "partition": "gpu",
    "time": "02:00:00",
    "cpus_per_task": 8,
    "gpus_per_node": 1,
    "mem": "64G",
    "account": None,
    "additional_parameters": {"mail-type": "FAIL", "exclusive": True},
    "setup": ["module load cuda/12.4", "source ~/venvs/ef/bin/activate"],
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def check_golden(name: str, text: str, directory=GOLDEN) -> None:
    """``text`` must equal the golden file ``name``. ``make golden`` (which sets
    EMBEDFLEET_UPDATE_GOLDEN=1 and runs only these tests) rewrites the files instead; in CI
    that is refused, or a run could accept its own regression."""
    path = directory / name
    if os.environ.get("EMBEDFLEET_UPDATE_GOLDEN"):
        if _in_ci():
            pytest.fail(
                "EMBEDFLEET_UPDATE_GOLDEN is set with CI=true: golden files are never "
                "regenerated in CI; run `make golden` on a workstation and commit the diff"
            )
        path.write_text(text)
    assert text == path.read_text(), (
        f"{name} differs from its golden file: if the change is intended, run `make golden` "
        "and review the diff of tests/golden/"
    )


def test_golden_update_is_refused_in_ci(tmp_path, monkeypatch):
    (tmp_path / "x.sbatch").write_text("kept\n")
    monkeypatch.setenv("EMBEDFLEET_UPDATE_GOLDEN", "1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="never regenerated in CI"):
        check_golden("x.sbatch", "changed\n", tmp_path)
    assert (tmp_path / "x.sbatch").read_text() == "kept\n"
    monkeypatch.delenv("CI")
    check_golden("x.sbatch", "changed\n", tmp_path)  # outside CI, the update is the point
    assert (tmp_path / "x.sbatch").read_text() == "changed\n"


def test_array_script_golden():
    text = render_array_script(
        script_path="/runs/q/slurm/embed-001.sbatch",
        run_dir="/runs/q",
        stage="embed",
        job_name="ef-q-embed",
        command=[
            "/opt/py/bin/python",
            "-m",
            "jobs.embed",
            "--run-dir",
            "/runs/q",
            "--stage",
            "embed",
        ],
        array="0-3,7,9-12%4",
        task_offset=1000,
        first_task=1000,
        last_task=1012,
        num_tasks=3000,
        log_dir="/runs/q/embed/logs",
        log_file_format="task_%05d.log",
        workdir="/src/embedfleet",
        resources=RES,
        env={"HF_HOME": "/scratch/hf cache"},
    )
    check_golden("array.sbatch", text)


def test_distributed_script_golden():
    text = render_distributed_script(
        script_path="/runs/q/slurm/kmeans_level1-004.sbatch",
        run_dir="/runs/q",
        stage="kmeans_level1",
        job_name="ef-q-kmeans_level1",
        command=["python", "-m", "jobs.kmeans", "--run-dir", "/runs/q"],
        nodes=2,
        ntasks_per_node=4,
        log_dir="/runs/q/kmeans/level1/logs",
        rank_log="/runs/q/kmeans/level1/logs/task_00000.rank%t.log",
        workdir="/src/embedfleet",
        resources={"time": "12:00:00", "mem": "64G"},
        forward=["WANDB_API_KEY", "HF_TOKEN"],
        env_file="/home/me/.wandb_api_key.sh",
    )
    check_golden("distributed.sbatch", text)


def test_sbatch_lines_sorted_and_validated():
    lines = sbatch_lines({"time": "1:00:00", "cpus_per_task": 2}, {"array": "0-9", "requeue": True})
    assert lines == sorted(lines)
    assert "--requeue" in lines and "--cpus-per-task=2" in lines
    with pytest.raises(ConfigError, match="unknown slurm resource 'gpus'.*valid: partition"):
        sbatch_lines({"gpus": 2}, {})
    with pytest.raises(ConfigError, match="newline"):
        sbatch_lines({"partition": "gpu\n#SBATCH --uid=0"}, {})
    with pytest.raises(ConfigError, match="not an sbatch flag"):
        sbatch_lines({"additional_parameters": {"x; rm": "1"}}, {})


def test_hostile_values_stay_one_word_on_one_line():
    hostile = "we ird'$(touch /tmp/PWNED)\nrm -rf /"
    assert "\n" not in quote(hostile)
    out = subprocess.run(
        ["bash", "-c", "printf %s " + quote(hostile)], capture_output=True, text=True
    )
    assert out.stdout == hostile
    assert "\n" not in job_name("ef", hostile)


def test_misspelt_resource_key_fails_at_config_time():
    from cli.run import prevalidate

    msg = prevalidate(
        ["+experiment=quickstart", "cluster=slurm", "cluster.slurm.resources.embed.gpu_per_node=1"]
    )
    assert "gpu_per_node" in msg and "valid keys under cluster.slurm.resources.embed" in msg
    assert "gpus_per_node" in msg


def test_stage_resources_override_defaults():
    cfg = compose(["+experiment=quickstart", "cluster=oscer"])
    embed = merged_resources(cfg, "embed")
    assert (
        embed["partition"] == "gpu" and embed["gpus_per_node"] == 1 and embed["time"] == "12:00:00"
    )
    assert merged_resources(cfg, "merge")["partition"] == "normal"
    assert cfg.cluster.scratch_dir == "$LSCRATCH"


def test_chunks_and_compressed_retry_lists():
    assert chunk_tasks(list(range(3000)), 1000) == [
        (0, list(range(1000))),
        (1000, list(range(1000))),
        (2000, list(range(1000))),
    ]
    assert chunk_tasks([3, 1005, 1006, 2999], 1000) == [(0, [3]), (1000, [5, 6]), (2000, [999])]
    assert parse_array_id("123_[8-10,12%2]") == ("123", [8, 9, 10, 12])
    assert parse_array_id("77") == ("77", None)


def test_submitting_from_inside_a_job_scrubs_its_environment(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SBATCH_PARTITION", "x")
    monkeypatch.setenv("SRUN_CPUS_PER_TASK", "3")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    env = scrubbed_env()
    assert (
        "SLURM_JOB_ID" not in env
        and "SBATCH_PARTITION" not in env
        and "SRUN_CPUS_PER_TASK" not in env
    )
    assert env["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    # what submitit's sbatch call sees in this process, and nothing changed afterwards
    with scrubbed_environ({"EF_EXTRA": "1"}):
        assert "SLURM_JOB_ID" not in os.environ and os.environ["EF_EXTRA"] == "1"
        assert os.environ["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    assert os.environ["SLURM_JOB_ID"] == "5" and "EF_EXTRA" not in os.environ


def _array(**kw):
    return render_array_script(
        script_path="/r/slurm/embed-001.sbatch", run_dir="/r", stage="embed", job_name="ef-r-embed",
        command=["python", "-m", "jobs.embed"], array="0-1", task_offset=0, first_task=0,
        last_task=1, num_tasks=2, log_dir="/r/embed/logs", log_file_format="task_%05d.log",
        workdir="/src", resources={}, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "env",
    [
        {"WANDB_API_KEY": "0123abcd"},
        {"DATABASE_URL": "postgres://u:pw0123@h/db"},
        {"MY_TOKEN": "t"},
    ],
)
def test_a_secret_is_never_rendered_into_a_script(env):
    (name,) = env
    with pytest.raises(ConfigError, match=rf"cluster\.env\.{name} looks like a secret.*pass_env"):
        _array(env=env)


def test_forwarded_names_are_exported_and_checked_at_job_start(tmp_path):
    text = _array(forward=["WANDB_API_KEY"], env={"HF_HOME": "/hf"}, env_file="/home/me/k.sh")
    assert "#SBATCH --export=ALL,WANDB_API_KEY\n" in text
    assert "\nsource /home/me/k.sh\n" in text
    (check,) = [line for line in text.splitlines() if "WANDB_API_KEY:?" in line]
    # The check is the job's own first use of the variable: it stops with the fix named.
    script = tmp_path / "check.sh"
    script.write_text(f"set -euo pipefail\n{check}\necho ok\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "export WANDB_API_KEY before submitting" in missing.stderr
    ok = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env={**env, "WANDB_API_KEY": "x"}
    )
    assert ok.returncode == 0 and ok.stdout == "ok\n"
