"""``cluster.multihost.storage=sync``'s pull (launchers.hosts.pull) over a real SFTP
connection to the namespace host n1, and the combinations the hosts launchers refuse.

The host's run dir is a directory of this machine (the namespace hosts share its file
system), written by the test as a finished task would leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path

import pytest

from launchers.hosts.launcher import HostsLauncher, TpuVmLauncher
from launchers.hosts.pull import pull_task
from lib.core.errors import ConfigError
from lib.core.markers import CompletionMarker
from lib.core.paths import RunPaths
from lib.core.storage import OutputFile
from lib.plan.spec import ARRAY, DISTRIBUTED, Plan, StageSpec
from lib.remote.credentials import Login
from lib.remote.errors import RemoteError
from lib.remote.ssh import Host, connect

MARKER = "embed/completions/task_00000.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finished_task(remote: Path) -> dict[str, bytes]:
    """A host's run dir holding task 0's two outputs and, last, its marker."""
    outputs = {
        "embed/shards/shard_00000.safetensors": os.urandom(700_000),
        "embed/shards/shard_00000.parquet": os.urandom(5_000),
    }
    for name, data in outputs.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(data)
    marker = CompletionMarker(
        stage="embed",
        task=0,
        num_tasks=1,
        config_hash="cfg0",
        outputs=[OutputFile(n, len(d), _sha(d)) for n, d in outputs.items()],
    )
    (remote / MARKER).parent.mkdir(parents=True)
    (remote / MARKER).write_text(json.dumps(marker.to_json()))
    return outputs


@pytest.fixture
def sftp(ssh_hosts):
    ssh_hosts.need_ns(["n1"])
    host = Host(ssh_hosts.address("n1"), ssh_hosts.port, "n1", ssh_hosts.known_hosts)
    login = Login(ssh_hosts.env["EF_NS_USER"], "key file", key_file=ssh_hosts.key)
    with connect(host, login) as conn:
        client = conn.sftp()
        yield client
        client.close()


def test_pull_publishes_verified_data_then_the_marker(sftp, tmp_path):
    """A corrupted output (its size as the marker says, other bytes) fails the pull: the
    marker is not local, that output is not published (no .part left), the one before it
    is (it verified). The bad file and the marker vouching for it are removed from the
    host (a later push, which compares size and whole-second time, could otherwise keep a
    bad copy of the right size written in the same second as the verified one). Once the
    host's copy is right, the pull publishes the rest, the marker last, with the host's
    modification times; a second pull fetches no output."""
    remote, local = tmp_path / "host-run", tmp_path / "run"
    outputs = _finished_task(remote)
    names = list(outputs)
    good = outputs[names[1]]
    marker_blob = (remote / MARKER).read_bytes()
    (remote / names[1]).write_bytes(bytes(len(good)))
    paths = RunPaths(local)

    with pytest.raises(RemoteError, match="sha256") as err:
        pull_task(sftp, str(remote), paths, MARKER)
    assert names[1] in str(err.value) and "(2 of its files removed from the host)" in str(err.value)
    assert not (local / MARKER).exists()
    assert (local / names[0]).read_bytes() == outputs[names[0]]
    assert not (local / names[1]).exists()
    assert not list(local.rglob("*.part"))
    assert not (remote / names[1]).exists() and not (remote / MARKER).exists()
    assert (remote / names[0]).read_bytes() == outputs[names[0]]  # it verified: kept

    (remote / names[1]).write_bytes(good)
    (remote / MARKER).write_bytes(marker_blob)
    pulled = pull_task(sftp, str(remote), paths, MARKER)
    assert pulled.files == [names[1], MARKER]
    assert pulled.skipped == [names[0]]
    for name in [*names, MARKER]:
        assert (local / name).read_bytes() == (remote / name).read_bytes()
        # the same time on both sides (a push then skips the file)
        assert (local / name).stat().st_mtime_ns == (remote / name).stat().st_mtime_ns

    again = pull_task(sftp, str(remote), paths, MARKER)
    assert again.files == [MARKER] and again.skipped == names


def test_pull_without_a_marker_or_with_a_missing_output_publishes_no_marker(sftp, tmp_path):
    remote, local = tmp_path / "host-run", tmp_path / "run"
    paths = RunPaths(local)
    (remote / "embed").mkdir(parents=True)
    with pytest.raises(RemoteError, match="no completion marker"):
        pull_task(sftp, str(remote), paths, MARKER)
    outputs = _finished_task(remote)
    (remote / next(iter(outputs))).unlink()
    with pytest.raises(RemoteError, match="cannot stat"):
        pull_task(sftp, str(remote), paths, MARKER)
    assert not (local / MARKER).exists()


def test_pull_refuses_an_output_outside_the_run_dir(sftp, tmp_path):
    remote, local = tmp_path / "host-run", tmp_path / "run"
    (remote / "embed" / "completions").mkdir(parents=True)
    marker = CompletionMarker(
        stage="embed", task=0, num_tasks=1, config_hash="c",
        outputs=[OutputFile("../../etc/passwd", 1, "0" * 64)],
    )  # fmt: skip
    (remote / MARKER).write_text(json.dumps(marker.to_json()))
    with pytest.raises(RemoteError, match="not a path inside the run dir"):
        pull_task(sftp, str(remote), RunPaths(local), MARKER)
    assert not (local / MARKER).exists()


def test_pull_brings_the_checkpoints_a_task_marker_lists_first(sftp, tmp_path):
    """A task marker listing checkpoint markers (a k-means level's steps): each
    checkpoint's outputs then its marker come before the task's outputs and marker; an
    output the task marker repeats (the final step's) or one already pulled is fetched
    once. A listed checkpoint missing on the host, or outside the run dir, fails the pull:
    no task marker local (what verified stays)."""
    remote, local = tmp_path / "host-run", tmp_path / "run"
    level = "kmeans/level1/completions/task_00000.json"
    steps = [f"kmeans/level1/step{s}/completions/task_00000.json" for s in range(2)]
    arrays = {f"kmeans/level1/step{s}/centroids.npy": os.urandom(3_000 + s) for s in range(2)}
    final = {"kmeans/level1/final.json": b"{}"}
    for name, data in {**arrays, **final}.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(data)

    def marker(name: str, outputs: dict[str, bytes], **extra) -> None:
        files = [OutputFile(n, len(d), _sha(d)) for n, d in outputs.items()]
        m = CompletionMarker(stage="kmeans_level1", task=0, num_tasks=1, config_hash="c",
                             outputs=files, **extra)  # fmt: skip
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_text(json.dumps(m.to_json()))

    (step0, a0), (step1, a1) = zip(steps, arrays, strict=True)
    marker(step0, {a0: arrays[a0]}, part="step0")
    marker(level, {**final, a1: arrays[a1]}, checkpoints=steps)
    paths = RunPaths(local)
    with pytest.raises(RemoteError, match=r"no completion marker at .*step1"):
        pull_task(sftp, str(remote), paths, level)
    assert not (local / level).exists()
    assert (local / step0).exists() and (local / a0).exists()  # verified: they stay
    marker(step1, {a1: arrays[a1]}, part="step1")
    pulled = pull_task(sftp, str(remote), paths, level)
    assert pulled.files == [step0, a1, step1, *final, level]
    assert pulled.skipped == [a0, a1]
    for name in [*arrays, *final, *steps, level]:
        assert (local / name).read_bytes() == (remote / name).read_bytes()
    marker(level, final, checkpoints=["../elsewhere/completions/task_00000.json"])
    with pytest.raises(RemoteError, match="not a path inside the run dir"):
        pull_task(sftp, str(remote), paths, level)
    assert not (local / level).exists()


def test_sync_refusals_name_the_key_and_the_fix(ssh_hosts, tmp_path):
    hosts = [{"name": "n1"}]
    with pytest.raises(ConfigError, match=r"storage=sync keeps each host's run dir.*workdir"):
        HostsLauncher(ssh_hosts.hosts_config(hosts, storage="sync"), echo=False)
    cfg = ssh_hosts.hosts_config(hosts, storage="sync", workdir=str(tmp_path))
    launcher = HostsLauncher(cfg, echo=False)
    with pytest.raises(ConfigError, match=r"storage=sync .* set run.root to a local path"):
        launcher.launch(RunPaths("memory://ef-sync-refusal/run"), Plan([], 0))
    shared = HostsLauncher(ssh_hosts.hosts_config(hosts), echo=False)
    bucket = RunPaths("memory://ef-sync-refusal/run")
    with pytest.raises(ConfigError, match=r"object-store run dir .* set cluster.multihost.workdir"):
        shared.launch(bucket, Plan([], 0))
    tpu_shared = ssh_hosts.hosts_config([])
    tpu_shared.cluster.launcher = "tpu_vm"
    workdir = r"cluster=tpu_vm with an object-store run dir .* cluster.multihost.workdir \(it may"
    with pytest.raises(ConfigError, match=workdir):
        TpuVmLauncher(tpu_shared, echo=False).launch(bucket, Plan([], 0))
    tpu_shared.cluster.multihost.workdir = str(tmp_path)
    tpu_shared.cluster.tpu_vm.tunnel_through_iap = True
    iap = r"not supported with cluster.tpu_vm.tunnel_through_iap=true: .*task logs.*internal_ip"
    with pytest.raises(ConfigError, match=rf"object-store run dir \(memory://ef-sync.*{iap}"):
        TpuVmLauncher(tpu_shared, echo=False).launch(bucket, Plan([], 0))
    tpu_shared.run.root = "s3://ef-bucket/runs"
    with pytest.raises(ConfigError, match=rf"run dir \(run.root=s3://ef-bucket/runs\) is {iap}"):
        TpuVmLauncher(tpu_shared, echo=False)
    tpu = ssh_hosts.hosts_config([], storage="sync", workdir=str(tmp_path))
    tpu.cluster.launcher = "tpu_vm"
    tpu.cluster.tpu_vm.tunnel_through_iap = True
    with pytest.raises(ConfigError, match=r"storage=sync is not supported with .*tunnel_thr"):
        TpuVmLauncher(tpu, echo=False)
    tpu.cluster.tpu_vm.tunnel_through_iap = False
    with pytest.raises(ConfigError, match=r"storage=sync keeps each host's run dir.*workdir"):
        TpuVmLauncher(ssh_hosts.hosts_config([], storage="sync"), echo=False)
    tpu.cluster.tpu_vm.slots = 2
    with pytest.raises(ConfigError, match=r"slots=2 .* clear_accelerator_holders=false"):
        TpuVmLauncher(tpu, echo=False)
    tpu.cluster.tpu_vm.clear_accelerator_holders = False
    TpuVmLauncher(tpu, echo=False)
    bad = ssh_hosts.hosts_config([{"name": "n1", "workdir": "runs/here"}], storage="sync")
    with pytest.raises(ConfigError, match=r"cluster.hosts\[0\].workdir=runs/here must be"):
        HostsLauncher(bad, echo=False).make_workers()


def test_sync_launch_runs_in_each_hosts_run_dir_and_retries_a_failed_pull(ssh_hosts, tmp_path):
    """storage=sync with a trivial job (tests/hosts/sync_job.py), n1 and n2 with workdirs
    of their own (code_sync=rsync): on n1 the job's marker lies about its output's sha256,
    so pulling from n1 fails, which counts as the task failing there: it runs again on n2
    and the stage completes with n2's bytes. Before the second stage the local run dir is
    pushed to both hosts (n1's stale marker replaced by the verified one). Pid files stay
    on the hosts; the logs come back."""
    dirs = {"n1": tmp_path / "w1", "n2": tmp_path / "w2"}
    cfg = ssh_hosts.hosts_config(
        [
            {"name": "n1", "workdir": str(dirs["n1"]), "env": {"SYNC_JOB_BAD_HOST": "n1"}},
            {"name": "n2", "workdir": str(dirs["n2"])},
        ],
        storage="sync",
        code_sync="rsync",
        host_failures_to_drop=3,
    )
    cfg.run.name = "sy"
    run = tmp_path / "sy"
    job = "tests.hosts.sync_job"
    plan = Plan([StageSpec(s, "embed", job, s, ARRAY, 2, "h") for s in ("a", "b")], 0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = HostsLauncher(cfg, echo=True).launch(RunPaths(str(run)), plan)
    text = out.getvalue()
    assert result.complete, text
    host_run = {h: d / "runs" / "sy" for h, d in dirs.items()}
    assert re.search(r"\[a \d\] failed on n1 \(pulling its outputs from n1 failed: .*sha256", text)
    for stage in ("a", "b"):
        for t in range(2):
            rec = json.loads((run / stage / "attempts" / f"task_{t:05d}.json").read_text())
            assert rec["host"] == "n2" and rec["returncode"] == 0, rec
            data = (run / stage / "data" / f"{t}.txt").read_bytes()
            assert data == (host_run["n2"] / stage / "data" / f"{t}.txt").read_bytes()
            assert f"task {t} in {host_run['n2']}\n".encode() in data
            assert f"task {t} wrote" in (run / stage / "logs" / f"task_{t:05d}.log").read_text()
            assert not list((run / stage / "attempts").glob("*.pid"))
            pids = [p for d in host_run.values() for p in (d / stage / "attempts").glob("*.pid")]
            assert pids
    # n1 ran a task of stage a (its pull failed); the push before stage b replaced its
    # marker and data with the local, verified ones
    for t in range(2):
        name = f"a/completions/task_{t:05d}.json"
        assert (host_run["n1"] / name).read_bytes() == (run / name).read_bytes()
        assert (host_run["n1"] / f"a/data/{t}.txt").read_bytes() == (
            run / f"a/data/{t}.txt"
        ).read_bytes()


def test_sync_runs_a_distributed_tasks_ranks_on_one_host(ssh_hosts, tmp_path):
    """Ranks of a distributed stage read each other's files (k-means steps), and under
    storage=sync each host has its own run dir: the ranks go to one host with enough
    slots (n1 here, though n2 is free too); with no such host the stage is refused."""
    cfg = ssh_hosts.hosts_config(
        [{"name": "n1", "slots": 2}, {"name": "n2"}],
        storage="sync",
        code_sync="rsync",
        workdir=str(tmp_path / "w"),
    )
    cfg.run.name = "d"
    spec = StageSpec("d", "kmeans", "tests.unit.launchers.echo_job", "d", DISTRIBUTED, 1, "h",
                     world_size=2)  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = HostsLauncher(cfg).launch(RunPaths(str(tmp_path / "d")), Plan([spec], 0))
    assert result.complete, out.getvalue()
    host_run = tmp_path / "w" / "runs" / "d"
    seen = [json.loads((host_run / "d" / "out" / f"0.{r}.json").read_text()) for r in range(2)]
    assert [s["EMBEDFLEET_HOST"] for s in seen] == ["n1", "n1"]
    assert (tmp_path / "d" / "d" / "completions" / "task_00000.json").exists()

    one_each = ssh_hosts.hosts_config(
        [{"name": "n1"}, {"name": "n2"}], storage="sync", workdir=str(tmp_path / "w")
    )
    with pytest.raises(ConfigError, match=r"none has 2 slots .*storage=shared"):
        HostsLauncher(one_each, echo=False).launch(RunPaths(str(tmp_path / "e")), Plan([spec], 0))


def test_sync_pulls_run_beside_the_scheduling_loop(ssh_hosts, tmp_path):
    """A pull that takes long (the first task's to end, held here until the other task's
    end is recorded) does not hold up the other tasks: the other task ends, is pulled and
    recorded while the first pull is in flight; then that one completes and the stage is
    complete. (Only the hold is added to the real pull, over real SFTP; with pulls inside
    the scheduling loop the hold times out.)"""
    dirs = {"n1": tmp_path / "w1", "n2": tmp_path / "w2"}
    cfg = ssh_hosts.hosts_config(
        [{"name": h, "workdir": str(d)} for h, d in dirs.items()],
        storage="sync",
        code_sync="rsync",
    )
    cfg.run.name = "sp"
    run = tmp_path / "sp"
    lock = threading.Lock()
    held: dict[str, object] = {}
    other_recorded = threading.Event()

    class HeldPull(HostsLauncher):
        def _pull(self, paths, spec, u, ok):
            with lock:
                first = "task" not in held
                if first:
                    held["task"] = u.task
            if first:
                held["released"] = other_recorded.wait(timeout=120)
            return super()._pull(paths, spec, u, ok)

        def _record(self, paths, spec, u, **fields):
            super()._record(paths, spec, u, **fields)
            if fields.get("ended") and held.get("task") not in (None, u.task):
                other_recorded.set()

    plan = Plan([StageSpec("a", "embed", "tests.hosts.sync_job", "a", ARRAY, 2, "h")], 0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = HeldPull(cfg, echo=True).launch(RunPaths(str(run)), plan)
    assert held.get("released") is True, f"the other task's end waited for the held pull: {held}"
    assert result.complete, out.getvalue()
    first = int(held["task"])  # type: ignore[call-overload]
    recs = {
        t: json.loads((run / "a" / "attempts" / f"task_{t:05d}.json").read_text()) for t in (0, 1)
    }
    assert recs[1 - first]["ended"] < recs[first]["ended"]
    assert {recs[0]["host"], recs[1]["host"]} == {"n1", "n2"}
    for t in (0, 1):
        assert (run / "a" / "completions" / f"task_{t:05d}.json").exists()
