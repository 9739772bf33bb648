"""The test SLURM cluster itself behaves like a real one (the launcher tests rely on it)."""

import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def wait_gone(job: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not sh("squeue", "-h", "-j", job):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} still queued after {timeout}s")


def sacct_states(job: str, expected: int, timeout: float = 60) -> dict[str, str]:
    """sacct lags the scheduler: poll until it reports ``expected`` records."""
    deadline = time.time() + timeout
    while True:
        out = sh("sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State")
        states = dict(line.split("|") for line in out.splitlines() if line)
        if len(states) >= expected and not any(
            s in ("PENDING", "RUNNING") for s in states.values()
        ):
            return states
        if time.time() > deadline:
            return states
        time.sleep(0.5)


def test_array_failure_is_accounted_and_afterany_runs(slurm_cluster, tmp_path):
    array = sh(
        "sbatch",
        "--parsable",
        "--array=0-5%3",
        "-o",
        str(tmp_path / "%a.out"),
        "--wrap",
        "[ $SLURM_ARRAY_TASK_ID -ne 3 ]",
    )
    dep = sh(
        "sbatch",
        "--parsable",
        f"--dependency=afterany:{array}",
        "-o",
        str(tmp_path / "dep.out"),
        "--wrap",
        "echo after",
    )
    wait_gone(array)
    states = sacct_states(array, 6)
    assert states[f"{array}_3"] == "FAILED"
    assert all(states[f"{array}_{i}"] == "COMPLETED" for i in (0, 1, 2, 4, 5))
    subprocess.run(["scontrol", "update", f"JobId={dep}", "StartTime=now"], check=False)
    wait_gone(dep)
    assert (tmp_path / "dep.out").read_text().strip() == "after"


def test_max_array_size_is_enforced(slurm_cluster):
    assert sh("scontrol", "show", "config").count("MaxArraySize            = 1000") == 1
    ok = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--array=0-999", "--wrap", "true"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0
    subprocess.run(["scancel", ok.stdout.strip()], check=True)
    bad = subprocess.run(
        ["sbatch", "--array=0-1000", "--wrap", "true"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "Invalid job array specification" in bad.stderr


def test_requeue_brings_a_job_back(slurm_cluster, tmp_path):
    out = tmp_path / "r.out"
    job = sh(
        "sbatch",
        "--parsable",
        "--requeue",
        "--open-mode=append",
        "-o",
        str(out),
        "--wrap",
        'echo "restart=${SLURM_RESTART_COUNT:-0}"; sleep 20',
    )
    deadline = time.time() + 60
    while "restart=0" not in (out.read_text() if out.exists() else "") and time.time() < deadline:
        time.sleep(0.3)
    subprocess.run(["scontrol", "requeue", job], check=True)
    time.sleep(1)
    # Slurm holds requeued jobs ~2 minutes before they are eligible; release it now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    deadline = time.time() + 90
    while "restart=1" not in out.read_text() and time.time() < deadline:
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=False)
    assert "restart=1" in out.read_text()
