"""Secrets end to end, through ``launch.py``: no raw value anywhere in the run root (run.yaml,
plan, markers, logs, attempt records), in a saved or printed script, or in the output
(local, and cluster=slurm --dry-run); a retry's tasks get the real secret from the
environment again, not ``***REDACTED***`` from run.yaml; W&B keeps its files under the run
dir and is quiet."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

from lib.config.redact import REDACTED
from tests.conftest import REPO
from tests.metrics_helpers import make_clustering

# Started in every Python process of a launch (PYTHONPATH): a task (it has a task index)
# records whether it saw the real secret, by its hash, and fails when told to.
PROBE = """
import hashlib, os
if "EMBEDFLEET_TASK_INDEX" in os.environ and "EF_PROBE_DIR" in os.environ:
    task = os.environ["EMBEDFLEET_TASK_INDEX"]
    value = os.environ.get(os.environ["EF_PROBE_VAR"])
    if value is None:
        state = "missing"
    elif hashlib.sha256(value.encode()).hexdigest() == os.environ["EF_PROBE_SHA256"]:
        state = "real"
    else:
        state = "redacted" if "REDACTED" in value else "other"
    with open(os.path.join(os.environ["EF_PROBE_DIR"], "seen.txt"), "a") as f:
        f.write(f"{task} {state}\\n")
    if os.path.exists(os.path.join(os.environ["EF_PROBE_DIR"], f"fail-{task}")):
        print(f"probe: task {task} fails on purpose", flush=True)
        os._exit(3)
"""
SECRET_VARS = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_KEY", "DATABASE_URL", "WANDB_API_KEY")


def _launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python launch.py ARGS`` in an environment without any of SECRET_VARS but ``env``'s."""
    full = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=full,
    )


def _leaks(raw: list[str], root: Path, *procs: subprocess.CompletedProcess) -> list[str]:
    """Where any of ``raw`` appears: files under ``root`` (all of them, any content) and
    the stdout/stderr of ``procs``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path}: {r}" for r in raw if r.encode() in data]
    for i, proc in enumerate(procs):
        for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            found += [f"command {i} {name}: {r}" for r in raw if r in text]
    return found


def test_local_run_and_retry_never_write_a_secret_and_tasks_get_the_real_one(tmp_path):
    values = {name: f"{name.lower()}-{secrets.token_hex(8)}" for name in SECRET_VARS[:3]}
    password = f"pw{secrets.token_hex(8)}"
    values["DATABASE_URL"] = f"postgres://u:{password}@db.example:5432/app"
    raw = [*(v for k, v in values.items() if k != "DATABASE_URL"), password]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    (probe / "fail-1").touch()
    root = tmp_path / "runs"
    hook = {
        "PYTHONPATH": os.pathsep.join([str(probe), str(REPO)]),
        "EF_PROBE_DIR": str(probe),
        "EF_PROBE_VAR": "HF_TOKEN",
        "EF_PROBE_SHA256": hashlib.sha256(values["HF_TOKEN"].encode()).hexdigest(),
    }
    args = [
        "+experiment=quickstart", f"run.root={root}", "run.name=sec", "stages=[embed]",
        "dataset.limit=8", "embed.num_shards=2", "merge.by_source=false",
        *(f"+cluster.env.{k}={v}" for k, v in values.items()),
    ]  # fmt: skip
    first = _launch(*args, env=hook)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "probe: task 1 fails on purpose" in first.stdout
    assert sorted((probe / "seen.txt").read_text().split("\n")[:-1]) == ["0 real", "1 real"]
    run = root / "sec"
    text = (run / "run.yaml").read_text()
    assert text.count(REDACTED) == 4 and f"postgres://u:{REDACTED}@db.example:5432/app" in text

    # The secrets were given on the first command line only: a retry asks for them.
    (probe / "fail-1").unlink()
    refused = _launch("retry", str(run), env=hook)
    assert refused.returncode == 1
    assert "run.yaml does not keep: export" in refused.stderr, refused.stderr
    # ... and reads them from its environment, as the first launch read its command line.
    retry = _launch("retry", str(run), env={**hook, **values})
    assert retry.returncode == 0, retry.stdout + retry.stderr
    seen = (probe / "seen.txt").read_text().split("\n")[:-1]
    assert seen[2:] == ["1 real"], seen
    assert (run / "embed" / "shards").is_dir()
    assert _leaks(raw, root, first, refused, retry) == []


def test_slurm_dry_run_refuses_a_secret_literal_and_forwards_secrets_by_name(shared_root, tmp_path):
    secret = f"wandb-{secrets.token_hex(12)}"
    name = f"sec-slurm-{os.getpid()}"
    common = [
        "+experiment=quickstart", f"run.root={shared_root}", f"run.name={name}",
        "cluster=slurm", "cluster.slurm.max_array_size=1000", "stages=[embed,merge]",
        "dataset.limit=8", "embed.num_shards=2", "--dry-run",
    ]  # fmt: skip
    literal = _launch(*common, f"+cluster.env.WANDB_API_KEY={secret}")
    assert literal.returncode == 1, literal.stdout
    assert "cluster.env.WANDB_API_KEY looks like a secret" in literal.stderr
    assert "cluster.pass_env=[WANDB_API_KEY]" in literal.stderr
    assert "cluster.env_file=FILE" in literal.stderr
    # submitit pickles its tasks' arguments into the run dir: the same refusal.
    args = [a for a in common if a != "cluster=slurm"]
    via_submitit = _launch(*args, "cluster=submitit", f"+cluster.env.WANDB_API_KEY={secret}")
    assert via_submitit.returncode == 1, via_submitit.stdout
    assert "cluster=submitit would write it" in via_submitit.stderr

    key_file = tmp_path / "wandb_api_key.sh"  # outside the run root, as ~/.wandb_api_key.sh
    key_file.write_text(f"export WANDB_API_KEY={secret}\n")
    key_file.chmod(0o600)
    forwarded = _launch(
        *common,
        "cluster.pass_env=[WANDB_API_KEY]",
        f"cluster.env_file={key_file}",
        env={"WANDB_API_KEY": secret},
    )
    assert forwarded.returncode == 0, forwarded.stderr
    out = forwarded.stdout
    assert out.count("#SBATCH --export=ALL,WANDB_API_KEY\n") == 2  # embed and merge
    assert out.count(f"\nsource {key_file}\n") == 2
    assert out.count(': "${WANDB_API_KEY:?is not set') == 2
    assert _leaks([secret], shared_root / name, literal, via_submitit, forwarded) == []
    assert secret not in out and not (shared_root / name / "run.yaml").exists()


def test_wandb_keeps_its_files_under_the_run_dir_and_is_quiet(tmp_path):
    """With HOME pointed at an empty dir: nothing appears there (~/.cache/wandb,
    ~/.local/share/wandb, ~/.config/wandb) nor in the working dir; no `wandb:` line and no
    deprecation warning in the output."""
    make_clustering(tmp_path / "root" / "toy")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    env.update(HOME=str(home), WANDB_MODE="offline", PYTHONPATH=str(REPO))
    absent = [p for p in (REPO / "wandb", REPO / "artifacts") if not p.exists()]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.metrics", "toy", f"run.root={tmp_path / 'root'}",
         f"metrics.output_dir={out}", "tracking=wandb", "metrics.levels=[1]"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert [line for line in output.splitlines() if "wandb:" in line] == []
    assert "deprecated" not in output.lower()
    assert sorted(home.rglob("*")) == []
    assert [p for p in absent if p.exists()] == []
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


def test_a_sweep_with_a_secret_on_its_command_line_is_refused(tmp_path):
    """Hydra writes a sweep's overrides into multirun.yaml, the run dir names and its log."""
    secret = f"hf_{secrets.token_hex(10)}"
    proc = _launch(
        "-m", "+experiment=quickstart", f"run.root={tmp_path}", "run.name=sw",
        "dataset.limit=8,9", f"+cluster.env.HF_TOKEN={secret}", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cluster.env.HF_TOKEN on the command line of a sweep (-m)" in proc.stderr
    assert "cluster.pass_env=[NAME]" in proc.stderr
    assert _leaks([secret], tmp_path, proc) == [] and list(tmp_path.iterdir()) == []
