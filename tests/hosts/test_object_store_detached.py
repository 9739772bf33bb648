"""Detached ``cluster=hosts`` runs with the run dir in a bucket (``run.root=s3://...``:
moto's S3 server on the namespace bridge, ``bridge_s3``) on the real namespace sshd hosts
n1 and n2, each with a workdir of its own (where the tasks' pid/exit files and logs are).

The launch starts the background scheduler on this machine and hands it the run's lock
object (which then names the scheduler); ``status``, ``logs`` of a running task (read
from its host), ``wait``, ``cancel`` and a relaunch that adopts the tasks of a killed
scheduler (its lock taken over as stale) work from here as for a local run dir. The
bucket's credentials reach the scheduler and the tasks only through the environment
(``cluster.pass_env``): no value is in a file, an object, a command line or an output.

Tasks are held in a setup line until the test creates a gate file (the hosts share this
machine's file system), so "while they run" is a fact of the test, not a matter of timing.

The same on ``cluster=tpu_vm``: the real gcloud CLI against tests/hosts/fake_tpu_api.py
(a 2-worker TPU whose workers are n1 and n2, as in tests/hosts/test_gcloud_cli.py), each
worker's workdir its own (``.../w{worker}``): tasks started through ``gcloud ... tpu-vm
ssh``, the code rsynced and each task's log copied back over SFTP over the ssh gcloud
prints for the worker (``--dry-run``), then uploaded into the bucket; detached (the
quickstart slice, its merged embeddings the local launcher's bytes) and attached (a
two-stage echo plan). The local reference runs once for the module.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cli.run import save_run_config
from lib.config.compose import compose
from lib.core.locks import process_alive
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, SINGLE, Plan, StageSpec
from tests.conftest import S3_BUCKET, _environment, run_launch
from tests.hosts.conftest import TpuNode, fake_tpu, gcloud_env, tpu_overrides
from tests.hosts.test_multihost import SLICE  # the same slice of the quickstart

HOSTS = ("n1", "n2")
PASS_ENV = (
    "cluster.pass_env=[AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_ENDPOINT_URL,AWS_DEFAULT_REGION]"
)
WAIT_S = 300  # only a bound for a broken run; the tests wait for facts, not durations


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns(HOSTS)


@pytest.fixture(scope="module")
def local_merged(tmp_path_factory) -> bytes:
    """The local launcher's merged embeddings of ``SLICE``: every run here must equal them."""
    root = tmp_path_factory.mktemp("local")
    _ok(run_launch(*SLICE, f"run.root={root}", "run.name=local", timeout=900))
    return (root / "local" / "merge" / "embeddings.safetensors").read_bytes()


@pytest.fixture
def env(bridge_s3):
    """The environment of every launch.py here: the bucket's endpoint and credentials,
    and a scratch dir of this test (where an object-store run keeps the scheduler's and
    the tasks' logs on this machine), short for ssh's control sockets made under it."""
    scratch = tempfile.mkdtemp(prefix="efosd-", dir="/tmp")
    try:
        yield {**bridge_s3, "TMPDIR": scratch}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def bucket(env: dict):
    """This process pointed at the bridge's server (s3fs's cached clients dropped on the
    way in and out: they were made for another endpoint, or would be kept)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with _environment(env):
            yield
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def _url(name: str) -> str:
    return f"s3://{S3_BUCKET}/osd-{os.getpid()}-{time.time_ns()}/{name}"


def _hosts(ns, dirs: dict[str, Path], gate: Path, echo: str = "") -> list[str]:
    """The overrides of n1 and n2 (one slot each, a workdir each, the code rsynced, the
    bucket's variables passed), every task held in its setup line until ``gate`` exists."""
    items = ", ".join(
        f"{{address: {ns.address(h)}, port: {ns.port}, name: {h}, workdir: {d}}}"
        for h, d in dirs.items()
    )
    base = [a for a in ns.hosts_overrides(HOSTS) if not a.startswith("cluster.hosts=")]
    hold = f"while [ ! -e {gate} ]; do sleep 0.1; done"
    return [
        *base,
        f"cluster.hosts=[{items}]",
        "cluster.multihost.code_sync=rsync",
        PASS_ENV,
        f"cluster.multihost.setup=['{echo}{hold}']",
    ]


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}:\n{text[-4000:]}"
    return text


def _row(status: str, stage: str) -> list[str]:
    line = next(ln for ln in status.splitlines() if ln.startswith(f"{stage} "))
    return line.split()[1:6]  # tasks done running failed pending


def _read_json(env: dict, url: str, name: str) -> dict | None:
    with bucket(env):
        return RunPaths(url).storage.read_json(name)


def _held(gate: Path) -> list[int]:
    """Pids of every process holding the gate path on its command line (the task shells
    of the run, on any namespace host: they share this pid namespace)."""
    out = subprocess.run(["pgrep", "-f", str(gate)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _leaks(secrets: list[str], *trees: Path) -> list[str]:
    """The files under ``trees`` holding a secret value."""
    found = []
    for tree in trees:
        for f in tree.rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                if any(s.encode() in data for s in secrets):
                    found.append(str(f))
    return found


def _wait_for(cond, what: str) -> None:
    deadline = time.time() + WAIT_S
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_detached_launch_on_s3_status_live_logs_wait_equal_local(ns, env, local_merged, tmp_path):
    """The quickstart slice, detached, run dir in the bucket: the launch returns while the
    embed tasks are held; the lock object names the scheduler; ``status`` reports two tasks
    running on n1/n2 and the scheduler running; ``logs`` of a running task prints its
    live log read from its host (named on stderr); a second launch is refused naming the
    scheduler; released, ``wait`` completes and the merged embeddings in the bucket are
    the local launcher's bytes; the scheduler's log is uploaded, the lock object gone. No
    credential value is in a launch output, the scheduler's or a task's command line, a
    file (workdirs, this machine's scratch) or an object of the run dir."""
    local = local_merged
    secrets = [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]]
    gate = tmp_path / "gate"
    dirs = {"n1": tmp_path / "w1", "n2": tmp_path / "w2"}
    url = _url("root")
    run = f"{url}/osd"
    echo = "echo first line of task $EMBEDFLEET_TASK_INDEX; "
    args = [*SLICE, *_hosts(ns, dirs, gate, echo), f"run.root={url}", "run.name=osd"]
    outputs = []
    try:
        launch = _ok(run_launch(*args, env=env, timeout=900))
        outputs.append(launch)
        sched = _read_json(env, run, "scheduler.json")
        assert sched is not None and sched["detached"] and sched["ended"] is None
        pid = sched["pid"]
        assert f"detached: the scheduler (pid {pid})" in launch, launch
        assert "submitted; watch with" in launch
        log_file = Path(env["TMPDIR"]).glob("embedfleet-staging/*/files/scheduler.log")
        log_file = next(log_file)
        assert f"its log: {log_file} on " in launch and f"{run}/scheduler.log" in launch
        assert sched["log"].startswith(f"{log_file} on ")
        assert process_alive(pid, sched["process_start"])
        argv = _cmdline(pid)
        assert b"launchers.hosts.detached" in argv and b"--lock-token" in argv
        lock = _read_json(env, run, "launcher.lock")
        assert lock is not None and lock["pid"] == pid, lock
        assert lock["command"].startswith("the detached scheduler of: ")

        status = _ok(run_launch("status", run, env=env), 3)
        outputs.append(status)
        assert _row(status, "embed") == ["3", "0", "2", "0", "1"], status
        assert f"scheduler: running (pid {pid} on " in status and "detached" in status
        hosts = {}
        for t in range(3):
            rec = _read_json(env, run, f"embed/attempts/task_{t:05d}.json") or {}
            if rec.get("host"):
                hosts[t] = rec["host"]
        assert sorted(hosts.values()) == sorted(HOSTS), hosts
        for t, host in hosts.items():
            assert f"  {host}: running embed {t}" in status, status
        outputs += _live_logs(env, run, hosts, lambda host: dirs[host] / "runs" / "osd")
        held = _held(gate)
        assert len(held) >= 2
        for p in [pid, *held]:
            assert not any(s.encode() in _cmdline(p) for s in secrets), p

        refused = _ok(run_launch("retry", run, env=env), 1)
        outputs.append(refused)
        assert f"in use by another launcher: pid {pid} on " in refused, refused
        assert "the detached scheduler of: " in refused

        gate.touch()
        done = _ok(run_launch("wait", run, "--interval", "0.5", "--timeout", "900", env=env))
        outputs.append(done)
    finally:
        gate.touch()  # a failed assertion leaves no task held
    assert "all stages complete" in done and "scheduler: ended" in done, done
    assert _row(done, "embed")[:2] == ["3", "3"] and _row(done, "merge")[:2] == ["1", "1"]
    assert not process_alive(pid, sched["process_start"])
    with bucket(env):
        storage = RunPaths(run).storage
        assert storage.read_bytes("merge/embeddings.safetensors") == local
        assert not storage.exists("launcher.lock")
        assert storage.read_json("scheduler.json")["result"] == "all stages complete"
        uploaded = storage.read_text("scheduler.log")
        assert "scheduler: all stages complete" in uploaded and "started on n" in uploaded
        objects = storage.list("")
        leaked = [n for n in objects if any(s.encode() in storage.read_bytes(n) for s in secrets)]
    assert not leaked, leaked
    ended = run_launch("logs", run, "embed", "0", env=env)  # the uploaded copy now
    outputs.append(_ok(ended))
    assert "first line of task 0" in ended.stdout and "the log on host" not in ended.stderr
    assert not any(s in text for s in secrets for text in outputs)
    assert not _leaks(secrets, *dirs.values(), Path(env["TMPDIR"]))


def _live_logs(env: dict, run: str, hosts: dict[int, str], host_run) -> list[str]:
    """``logs RUN embed T`` of each running task ``T`` of ``hosts`` (task -> host): its
    first line, read from the log in ``host_run(host)`` on its host (named on stderr) once
    it is there; the outputs."""
    outputs = []
    for t, host in hosts.items():
        there = host_run(host) / "embed" / "logs" / f"task_{t:05d}.log"
        _wait_for(lambda p=there: p.exists() and b"first line" in p.read_bytes(), there)
        logs = run_launch("logs", run, "embed", str(t), env=env)
        outputs.append(_ok(logs))
        assert logs.stdout == f"first line of task {t}\n", logs.stdout
        assert f"the log on host {host}: {there} (running)" in logs.stderr, logs.stderr
    return outputs


def _echo_run(ns, env: dict, tmp_path: Path) -> tuple[str, Path, dict[str, Path]]:
    """A run dir in the bucket, made by hand (run.yaml + plan.json): two echo-job stages,
    ``a`` (3 tasks) then ``b`` (1), on n1 and n2; every task held until the gate exists.
    Returns (its URL, the gate, the hosts' workdirs)."""
    gate = tmp_path / "gate"
    dirs = {"n1": tmp_path / "w1", "n2": tmp_path / "w2"}
    cfg = compose(["+experiment=quickstart", *_hosts(ns, dirs, gate)])
    url = _url("root")
    cfg.run.root, cfg.run.name, cfg.run.dir = url, "osc", f"{url}/osc"
    job = "tests.unit.launchers.echo_job"
    stages = [
        StageSpec("a", "embed", job, "a", ARRAY, 3, "h"),
        StageSpec("b", "merge", job, "b", SINGLE, 1, "h", depends_on=("a",)),
    ]
    with bucket(env):
        paths = RunPaths(f"{url}/osc")
        save_run_config(paths, cfg)
        Plan(stages, 0).save(paths)
    return f"{url}/osc", gate, dirs


def test_killed_scheduler_stale_lock_taken_over_adopting_relaunch_then_cancel(ns, env, tmp_path):
    """On a bucket run dir: ``kill -9`` of the detached scheduler leaves its tasks held and
    the lock object naming a dead process of this host; ``status`` says it is gone; a
    relaunch takes the lock over as stale (warning), adopts the two tasks still running
    and hands the lock to its new scheduler; ``cancel`` stops that scheduler and every
    task process on the hosts (none left, their process groups gone), the lock object
    removed, the tasks pending again."""
    run, gate, dirs = _echo_run(ns, env, tmp_path)
    try:
        _ok(run_launch("retry", run, env=env))
        first = _read_json(env, run, "scheduler.json")
        assert (
            first is not None
            and (_read_json(env, run, "launcher.lock") or {}).get("pid") == first["pid"]
        )
        os.kill(first["pid"], 9)
        _wait_for(lambda: not process_alive(first["pid"], first["process_start"]), "the kill")
        assert len(_held(gate)) >= 2  # its tasks run on

        status = _ok(run_launch("status", run, env=env), 3)
        assert f"scheduler gone: pid {first['pid']} on " in status, status
        assert _row(status, "a")[2] == "2"

        again = _ok(run_launch("retry", run, env=env))
        assert f"taking over a stale lock (pid {first['pid']} on " in again, again
        for t in (0, 1):
            assert f"[a {t}] adopting attempt 1 on " in again, again
        second = _read_json(env, run, "scheduler.json")
        assert second is not None and second["pid"] != first["pid"]
        assert (_read_json(env, run, "launcher.lock") or {}).get("pid") == second["pid"]
        pgids = [
            int(
                (
                    dirs[rec["host"]] / "runs" / "osc" / "a" / "attempts"
                    / f"task_{t:05d}.rank0.a1.pid"
                ).read_text()
            )
            for t in (0, 1)
            for rec in [_read_json(env, run, f"a/attempts/task_{t:05d}.json") or {}]
        ]  # fmt: skip

        cancel = _ok(run_launch("cancel", run, env=env))
    finally:
        if _held(gate):  # a failed assertion leaves no task held
            gate.touch()
    assert f"stopped the scheduler (pid {second['pid']} on " in cancel, cancel
    assert not process_alive(second["pid"], second["process_start"])
    assert _held(gate) == [], "a task process is left on a host"
    for pgid in pgids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    with bucket(env):
        storage = RunPaths(run).storage
        assert not storage.exists("launcher.lock")
        assert storage.read_json("scheduler.json")["ended"]
        assert "its tasks were stopped" in storage.read_text("scheduler.log")
    after = _ok(run_launch("status", run, env=env), 3)
    assert _row(after, "a") == ["3", "0", "0", "0", "3"], after
    assert "scheduler: ended" in after


# -- cluster=tpu_vm: the same through the real gcloud CLI ---------------------------------

TPU = "ef-tpu-os"


@pytest.fixture(scope="module")
def tpu_env(ns, tmp_path_factory):
    """The fake TPU API with ef-tpu-os (workers n1, n2) and the environment pointing gcloud
    at it (its HOME holds gcloud's known_hosts); this process's own environment untouched."""
    base = tmp_path_factory.mktemp("gcloud")
    with fake_tpu(ns, base, {TPU: TpuNode("4747", HOSTS)}, patch_env=False) as api:
        yield api, gcloud_env(api, base)


def _tpu(ns, tmp_path: Path, gate: Path | None = None, echo: str = "") -> list[str]:
    """The overrides of ef-tpu-os: a workdir a worker (``tmp_path/w0``, ``w1``), the code
    rsynced, the bucket's variables passed, (``gate``) every task held until it exists."""
    hold = [f"cluster.multihost.setup=['{echo}while [ ! -e {gate} ]; do sleep 0.1; done']"]
    return [
        *tpu_overrides(ns, TPU),
        f"cluster.multihost.workdir='{tmp_path}/w{{worker}}'",  # quoted: Hydra's braces
        "cluster.multihost.code_sync=rsync",
        "cluster.multihost.poll_s=1",
        PASS_ENV,
        *(hold if gate else []),
    ]


def _leaked_objects(env: dict, run: str, secrets: list[str]) -> list[str]:
    with bucket(env):
        storage = RunPaths(run).storage
        return [
            n for n in storage.list("") if any(s.encode() in storage.read_bytes(n) for s in secrets)
        ]


def test_tpu_vm_detached_on_s3_live_logs_uploaded_logs_equal_local(
    ns, env, tpu_env, local_merged, tmp_path
):
    """cluster=tpu_vm, run dir in the bucket, detached: the launch returns while the embed
    tasks are held on ef-tpu-os's two workers; ``logs`` of a running task reads its live
    log from its worker (through gcloud, named on stderr); released, ``wait`` completes,
    the merged embeddings in the bucket are the local launcher's bytes, every task's log
    was copied from its worker over the derived ssh and uploaded into the bucket. No
    credential value is in an output, a task's command line, a file (the workers' dirs,
    this machine's scratch, gcloud's config) or an object of the run dir."""
    _, genv = tpu_env
    env = {**env, **genv}
    secrets = [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]]
    gate = tmp_path / "gate"
    url = _url("root")
    run = f"{url}/ost"
    echo = "echo first line of task $EMBEDFLEET_TASK_INDEX; "
    args = [*SLICE, *_tpu(ns, tmp_path, gate, echo), f"run.root={url}", "run.name=ost"]
    outputs = []
    try:
        launch = _ok(run_launch(*args, env=env, timeout=900))
        outputs.append(launch)
        assert "tpu_vm: 2 host(s)" in launch and "detached: the scheduler" in launch, launch
        sched = _read_json(env, run, "scheduler.json")
        assert sched is not None and sched["detached"] and sched["ended"] is None
        hosts: dict[int, str] = {}

        def placed() -> bool:
            for t in range(3):
                rec = _read_json(env, run, f"embed/attempts/task_{t:05d}.json") or {}
                if rec.get("host"):
                    hosts[t] = rec["host"]
            return len(hosts) == 2

        _wait_for(placed, "two embed tasks placed")
        assert sorted(hosts.values()) == [f"{TPU}/w0", f"{TPU}/w1"], hosts
        outputs += _live_logs(
            env, run, hosts, lambda host: tmp_path / f"w{host[-1]}" / "runs" / "ost"
        )
        held = _held(gate)
        assert len(held) >= 2
        for p in [sched["pid"], *held]:
            assert not any(s.encode() in _cmdline(p) for s in secrets), p
        gate.touch()
        done = _ok(run_launch("wait", run, "--interval", "1", "--timeout", "900", env=env))
        outputs.append(done)
    finally:
        gate.touch()  # a failed assertion leaves no task held
    assert "all stages complete" in done, done
    assert _row(done, "embed")[:2] == ["3", "3"] and _row(done, "merge")[:2] == ["1", "1"]
    with bucket(env):
        storage = RunPaths(run).storage
        assert storage.read_bytes("merge/embeddings.safetensors") == local_merged
        assert not storage.exists("launcher.lock")
        for t in range(3):  # copied from its worker over SFTP, uploaded
            assert f"first line of task {t}\n" in storage.read_text(f"embed/logs/task_{t:05d}.log")
        assert "first line of task 0" in storage.read_text("merge/logs/task_00000.log")
    ended = run_launch("logs", run, "embed", "0", env=env)  # the uploaded copy now
    outputs.append(_ok(ended))
    assert "first line of task 0" in ended.stdout and "the log on host" not in ended.stderr
    assert not _leaked_objects(env, run, secrets)
    assert not any(s in text for s in secrets for text in outputs)
    assert not _leaks(secrets, tmp_path, Path(env["TMPDIR"]), Path(genv["HOME"]).parent)


def test_tpu_vm_attached_on_s3_two_stages_logs_uploaded(ns, env, tpu_env, tmp_path):
    """cluster=tpu_vm, run dir in the bucket, ``--attach``: a two-stage echo plan runs in
    the foreground on ef-tpu-os's workers, its markers and outputs in the bucket, each
    task's log streamed with its worker's prefix and uploaded into the bucket; no lock
    left, no credential value in the output, a file or an object."""
    _, genv = tpu_env
    env = {**env, **genv}
    secrets = [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]]
    cfg = compose(["+experiment=quickstart", *_tpu(ns, tmp_path)])
    url = _url("root")
    cfg.run.root, cfg.run.name, cfg.run.dir = url, "ota", f"{url}/ota"
    job = "tests.unit.launchers.echo_job"
    stages = [
        StageSpec("a", "embed", job, "a", ARRAY, 3, "h"),
        StageSpec("b", "merge", job, "b", SINGLE, 1, "h", depends_on=("a",)),
    ]
    run = f"{url}/ota"
    with bucket(env):
        paths = RunPaths(run)
        save_run_config(paths, cfg)
        Plan(stages, 0).save(paths)
    out = _ok(run_launch("retry", run, "--attach", env=env, timeout=900))
    assert "tpu_vm: 2 host(s)" in out and "b: done in " in out, out
    with bucket(env):
        storage = RunPaths(run).storage
        for stage, n in (("a", 3), ("b", 1)):
            for t in range(n):
                assert storage.exists(f"{stage}/completions/task_{t:05d}.json"), (stage, t)
                log = storage.read_text(f"{stage}/logs/task_{t:05d}.log")
                assert f"hello from task {t} rank 0" in log, log
                rec = storage.read_json(f"{stage}/out/{t}.0.json")
                assert rec["EMBEDFLEET_LAUNCHER"] == "tpu_vm"
                assert rec["EMBEDFLEET_HOST"] in (f"{TPU}/w0", f"{TPU}/w1")
        assert not storage.exists("launcher.lock")
    # each log echoed with its worker's prefix (from the copy taken over SFTP)
    assert re.search(rf"\[{TPU}/w[01] a 0\] hello from task 0 rank 0", out), out
    assert not _leaked_objects(env, run, secrets)
    assert not any(s in out for s in secrets)
    assert not _leaks(secrets, tmp_path, Path(env["TMPDIR"]))
