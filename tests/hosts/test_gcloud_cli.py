"""cluster=tpu_vm through the real ``gcloud`` CLI (tier 2 of the TPU tests).

Google's TPU API cannot exist here: ``tests/hosts/fake_tpu_api.py`` stands in for it, a
small HTTP server on loopback that gcloud is pointed at
(``CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU``/``_COMPUTE``, no credentials, a throwaway
``CLOUDSDK_CONFIG``). Everything else is real: the installed ``gcloud`` reads the node
(``describe``, and before every ``tpu-vm ssh --worker=i``), builds its own ssh command and
runs the real ``ssh`` to the worker's address, a namespace sshd (n1, n2 of
scripts/hosts/up.sh; port 2222 through ``cluster.tpu_vm.ssh_flags``). Host keys stay
strict (``--strict-host-key-checking=yes``): gcloud checks them in
``~/.ssh/google_compute_known_hosts`` (its fixed path, under ``$HOME``) under the alias
``tpu.NODE_ID-WORKER``, so the tests set ``HOME`` to a directory of their own and write
that file there.

gcloud retries a worker whose ssh fails 10 times, 5 s apart (about a minute), so the
refused-host-key launch starts in the background with the module and is checked last.
The real ``gcloud`` is on this machine image (the Debian ``google-cloud-cli`` package,
which ``make install`` cannot install: Google's apt repository): under CI=true a missing
gcloud or a server that cannot start fails these tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launchers.hosts.commands import TpuTarget, gcloud_ssh_dry_run_argv
from launchers.hosts.launcher import TpuVmLauncher
from lib.config.schema import EmbedfleetConfig
from lib.core.errors import ConfigError
from lib.core.markers import check_marker
from lib.core.paths import RunPaths
from lib.plan.spec import ARRAY, Plan, StageSpec
from lib.remote.errors import HostKeyError, RemoteError
from lib.remote.ssh import connect
from tests.conftest import REPO, run_launch
from tests.hosts.conftest import TPU_PROJECT, TPU_ZONE, TpuNode, fake_tpu

pytestmark = pytest.mark.slow

JOB = "tests.unit.launchers.echo_job"
PROJECT, ZONE = TPU_PROJECT, TPU_ZONE
NS = ("n1", "n2")  # n3 is cut off by tests/hosts/test_multihost.py, maybe at the same time
TPU, BADKEY, STOPPED = "ef-tpu", "ef-tpu-badkey", "ef-tpu-stopped"
IDS = {TPU: "4242", BADKEY: "4343", STOPPED: "4444"}


@pytest.fixture(scope="module")
def ns(ssh_hosts):
    return ssh_hosts.need_ns(NS)


@pytest.fixture(scope="module")
def tpu(ns, tmp_path_factory):
    """The fake API (ef-tpu: n1, n2; ef-tpu-badkey: the same workers, a wrong key for
    worker 1 in known_hosts; ef-tpu-stopped) and this process's environment pointed at
    it, with HOME (gcloud's known_hosts) in a directory of the test's."""
    nodes = {
        TPU: TpuNode(IDS[TPU], NS),
        BADKEY: TpuNode(IDS[BADKEY], NS, wrong_keys=(1,)),
        STOPPED: TpuNode(IDS[STOPPED], NS, state="STOPPED"),
    }
    with fake_tpu(ns, tmp_path_factory.mktemp("gcloud"), nodes) as api:
        yield api


def _cfg(ns, name: str, **multihost):
    return OmegaConf.merge(
        OmegaConf.structured(EmbedfleetConfig),
        {
            "cluster": {
                "launcher": "tpu_vm",
                "tpu_vm": {
                    "name": name,
                    "zone": ZONE,
                    "project": PROJECT,
                    "user": ns.env["EF_NS_USER"],
                    "ssh_key_file": ns.key,
                    "ssh_flags": [f"-p {ns.port}"],
                },
                "multihost": {"connect_timeout_s": 5, "poll_s": 3, **multihost},
            }
        },
    )


REFUSED = """
import json, sys
from omegaconf import OmegaConf
from launchers.hosts.launcher import TpuVmLauncher
from lib.core.paths import RunPaths
from lib.plan.spec import Plan, StageSpec
cfg = OmegaConf.create(json.loads(sys.argv[2]))
spec = StageSpec("a", "embed", sys.argv[3], "a", "array", 2, "h")
try:
    TpuVmLauncher(cfg).launch(RunPaths(sys.argv[1]), Plan([spec], 0))
except Exception as exc:
    print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1)
"""


@pytest.fixture(scope="module")
def refused(ns, tpu, tmp_path_factory):
    """The launch on ef-tpu-badkey, started now: gcloud retries the refused worker for
    about a minute, which the other tests do not wait for."""
    run = tmp_path_factory.mktemp("badkey") / "run"
    cfg = _cfg(ns, BADKEY, command_timeout_s=300)
    proc = subprocess.Popen(
        [sys.executable, "-c", REFUSED, str(run), json.dumps(OmegaConf.to_container(cfg)), JOB],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, run
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_array_stage_on_tpu_workers_through_real_gcloud(ns, tpu, refused, tmp_path, capsys):
    """4 tasks on the 2 workers of ef-tpu: describe gives the workers, every call is one
    `gcloud compute tpus tpu-vm ssh --worker=i` that reaches worker i's own machine, the
    tasks write their outputs and markers in a run dir whose path would break naive
    quoting, and gcloud found the key in the node's metadata (no update sent)."""
    run = tmp_path / "run  dir 'q' $(touch PWNED)"
    where = tmp_path / "where.txt"
    setup = (
        f'echo "$EMBEDFLEET_TASK_INDEX $EMBEDFLEET_HOST '
        f"$(ip -o -4 addr show dev eth0 | awk '{{print $4}}')\" >> {where}"
    )
    cfg = _cfg(ns, TPU, setup=[setup])
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 4, "h")
    result = TpuVmLauncher(cfg).launch(RunPaths(str(run)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    assert "tpu_vm: 2 host(s), 2 slot(s): ef-tpu/w0 x1, ef-tpu/w1 x1" in out, out
    paths = RunPaths(str(run))
    addr = {f"{TPU}/w{i}": ns.address(h) for i, h in enumerate(NS)}
    ran = {}
    for t in range(4):
        assert check_marker(paths, "a", t, "h"), f"task {t} has no valid marker"
        rec = json.loads((run / "a" / "out" / f"{t}.0.json").read_text())
        assert rec["EMBEDFLEET_LAUNCHER"] == "tpu_vm" and rec["task"] == t
        attempt = json.loads((run / "a" / "attempts" / f"task_{t:05d}.json").read_text())
        assert attempt["returncode"] == 0 and attempt["host"] == rec["EMBEDFLEET_HOST"]
        ran[t] = rec["EMBEDFLEET_HOST"]
    # each task ran on the machine of its worker (the address its eth0 holds there)
    seen = {}
    for ln in where.read_text().splitlines():
        task, label, ip = ln.split()
        seen[int(task)] = (label, ip.split("/")[0])
    assert seen == {t: (label, addr[label]) for t, label in ran.items()}
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()
    node = f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes/{TPU}"
    gets = tpu.seen("GET", f"^{node}$")
    guest = tpu.seen("POST", f"^{node}:getGuestAttributes$")
    # describe + one node read per ssh (preflight, starts, probes): one worker each
    assert len(gets) == 1 + len(guest) and len(guest) >= 2 + 4
    assert {json.loads(r.body)["workerIds"][0] for r in guest} == {"0", "1"}
    assert all(len(json.loads(r.body)["workerIds"]) == 1 for r in guest)
    assert not tpu.seen("PATCH") and not tpu.seen("PUT")
    known = (r"^/v2/projects/[^/]+/locations/[^/]+/nodes/[^/]+(:getGuestAttributes)?$|"
             r"^/compute/v1/projects/[^/]+$")  # fmt: skip
    assert all(re.match(known, r.path) for r in tpu.seen()), tpu.seen()


def test_pass_env_reaches_tpu_workers_through_gcloud_stdin(ns, tpu, tmp_path, capsys, monkeypatch):
    """cluster.pass_env on cluster=tpu_vm: the secret's NAME=VALUE lines go on the stdin of
    `gcloud compute tpus tpu-vm ssh --worker=i`, which hands it to its ssh; the tasks on
    both workers see the exact value (a hostile one, several lines), no process's argv on
    the worker holds it, and nothing in the run dir or the output does."""
    from tests.hosts.test_multihost_code_env import SECRET, SECRET_JOB, SECRET_VAR, _files_with

    monkeypatch.setenv(SECRET_VAR, SECRET)
    cfg = OmegaConf.merge(_cfg(ns, TPU), {"cluster": {"pass_env": [SECRET_VAR]}})
    run = tmp_path / "run"
    spec = StageSpec("a", "embed", SECRET_JOB, "a", ARRAY, 2, "h")
    result = TpuVmLauncher(cfg).launch(RunPaths(str(run)), Plan([spec], 0))
    out = capsys.readouterr().out
    assert result.complete, out
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    hosts = set()
    for t in (0, 1):
        rec = json.loads((run / "a" / "out" / f"{t}.json").read_text())
        assert rec["sha256"] == digest and rec["in_ps"] is False and rec["saw_task_shell"]
        hosts.add(json.loads((run / "a" / "attempts" / f"task_{t:05d}.json").read_text())["host"])
    assert hosts == {f"{TPU}/w0", f"{TPU}/w1"}  # one task a worker: both got it
    needles = [part.encode() for part in SECRET.splitlines()]
    assert _files_with(run, needles) == [] and not any(n.decode() in out for n in needles)
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


def _group_alive(pgid: int) -> bool:
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not s.startswith("Z") for s in out.stdout.split())


def _until(cond, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_launch_py_status_and_cancel_on_tpu_workers_through_real_gcloud(ns, tpu, tmp_path):
    """``launch.py`` itself on cluster=tpu_vm through the real gcloud: the detached launch
    returns with the quickstart's two embed tasks held in a setup line on ef-tpu's two
    workers (no model loaded), ``status`` reconnects through gcloud and reports both
    running on their workers, ``cancel`` kills both remote process groups through gcloud
    (nothing of them is left), and ``status`` then says the scheduler stopped them (pending
    again: a relaunch runs them)."""
    run = tmp_path / "runs" / "held"
    user = ns.env["EF_NS_USER"]
    launched = run_launch(
        "+experiment=quickstart",
        "dataset.limit=8",
        "embed.num_shards=2",
        "stages=[embed]",
        "cluster=tpu_vm",
        f"cluster.tpu_vm.name={TPU}",
        f"cluster.tpu_vm.zone={ZONE}",
        f"cluster.tpu_vm.project={PROJECT}",
        f"cluster.tpu_vm.user={user}",
        f"cluster.tpu_vm.ssh_key_file={ns.key}",
        f"cluster.tpu_vm.ssh_flags=['-p {ns.port}']",
        "cluster.multihost.setup=['sleep 600']",
        "cluster.multihost.connect_timeout_s=5",
        "cluster.multihost.poll_s=1",
        f"run.root={tmp_path / 'runs'}",
        "run.name=held",
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "tpu_vm: 2 host(s)" in launched.stdout, launched.stdout
    attempts = run / "embed" / "attempts"
    pid_files = [attempts / f"task_{t:05d}.rank0.a1.pid" for t in range(2)]
    _until(lambda: all(f.exists() and f.read_text().strip() for f in pid_files), "both tasks")
    pgids = [int(f.read_text()) for f in pid_files]
    assert all(_group_alive(p) for p in pgids)
    guest = f"^/v2/projects/{PROJECT}/locations/{ZONE}/nodes/{TPU}:getGuestAttributes$"
    before = len(tpu.seen("POST", guest))

    status = run_launch("status", str(run))
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith("embed "))
    assert row.split()[1:6] == ["2", "0", "2", "0", "0"], status.stdout
    hosts = {json.loads((attempts / f"task_{t:05d}.json").read_text())["host"] for t in range(2)}
    assert hosts == {f"{TPU}/w0", f"{TPU}/w1"}
    assert f"{TPU}/w0: running embed" in status.stdout, status.stdout
    probed = len(tpu.seen("POST", guest))
    assert probed > before, "status did not reach the workers through gcloud"

    cancel = run_launch("cancel", str(run))
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    _until(lambda: not any(_group_alive(p) for p in pgids), "no process left", timeout=60)
    assert len(tpu.seen("POST", guest)) > probed, "cancel did not go through gcloud"
    after = run_launch("status", str(run))
    row = next(ln for ln in after.stdout.splitlines() if ln.startswith("embed "))
    # the scheduler, alive, stopped its tasks itself: pending again, for a relaunch
    assert row.split()[1:6] == ["2", "0", "0", "0", "2"], after.stdout
    assert "its tasks were stopped" in after.stdout, after.stdout


def test_describe_reads_workers_and_refuses_a_tpu_not_ready(ns, tpu):
    launcher = TpuVmLauncher(_cfg(ns, TPU))
    assert launcher.describe(TPU) == [ns.address(h) for h in NS]
    with pytest.raises(RemoteError, match=f"TPU {STOPPED} is STOPPED, not READY"):
        launcher.describe(STOPPED)
    with pytest.raises(RemoteError, match="TPU ef-tpu-missing: .*describe ef-tpu-missing"):
        launcher.describe("ef-tpu-missing")


def test_changed_host_key_of_a_worker_refused_with_its_fingerprint(ns, refused):
    """ef-tpu-badkey's worker 1 offers n2's key, known_hosts holds another: gcloud's
    strict check refuses it, the launch stops before any task, naming the worker and
    the SHA256 fingerprint it offered."""
    proc, run = refused
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out[-3000:]
    real = subprocess.run(
        ["ssh-keygen", "-lf", str(ns.host_pub_key("n2"))], capture_output=True, text=True
    ).stdout.split()[1]
    assert f"host {BADKEY}/w1: refused" in out and "differs from known_hosts" in out, out[-3000:]
    assert real in out, out[-3000:]
    assert "google_compute_known_hosts under the alias tpu.NODE_ID-1" in out, out[-3000:]
    assert f"gcloud compute tpus tpu-vm ssh {BADKEY} --worker=1 --command=true" in out
    assert not (run / "a" / "attempts").exists()


def test_sync_stages_on_tpu_workers_through_real_gcloud(ns, tpu, tmp_path, capsys):
    """storage=sync on ef-tpu's two workers, each with a workdir of its own
    (``cluster.multihost.workdir=.../w{worker}``: the namespace hosts share this machine's
    file system), code_sync=rsync: the code rsync, the run-dir push and the SFTP pulls go
    over the ssh that gcloud prints for each worker (``--dry-run``), checking host keys in
    gcloud's known_hosts under the workers' aliases (it has no line under their
    addresses), while starts and probes go through ``gcloud tpu-vm ssh``. On w0 the job's
    marker lies about its output's sha256, so each pull from w0 fails and the task runs
    again on w1; the stages complete with w1's bytes, and the push before stage b
    replaces w0's stale copies with the local, verified ones."""
    cfg = _cfg(
        ns,
        TPU,
        storage="sync",
        code_sync="rsync",
        workdir=str(tmp_path / "w{worker}"),
        host_failures_to_drop=3,
        poll_s=1,
    )
    cfg.cluster.env = {"SYNC_JOB_BAD_HOST": f"{TPU}/w0"}
    cfg.run.name = "sy"
    run = tmp_path / "sy"
    plan = Plan([StageSpec(s, "embed", "tests.hosts.sync_job", s, ARRAY, 2, "h") for s in "ab"], 0)
    result = TpuVmLauncher(cfg).launch(RunPaths(str(run)), plan)
    out = capsys.readouterr().out
    assert result.complete, out
    host_run = {i: tmp_path / f"w{i}" / "runs" / "sy" for i in (0, 1)}
    assert all((tmp_path / f"w{i}" / "launch.py").is_file() for i in (0, 1))  # the code rsync
    pattern = rf"\[a \d\] failed on {TPU}/w0 \(pulling its outputs from {TPU}/w0 failed: .*sha256"
    assert re.search(pattern, out), out
    for stage in "ab":
        for t in range(2):
            rec = json.loads((run / stage / "attempts" / f"task_{t:05d}.json").read_text())
            assert rec["host"] == f"{TPU}/w1" and rec["returncode"] == 0, rec
            data = (run / stage / "data" / f"{t}.txt").read_bytes()
            assert data == (host_run[1] / stage / "data" / f"{t}.txt").read_bytes()
            assert f"task {t} in {host_run[1]}\n".encode() in data
            assert f"task {t} wrote" in (run / stage / "logs" / f"task_{t:05d}.log").read_text()
            assert check_marker(RunPaths(str(run)), stage, t, "h")
    for t in range(2):  # w0 ran stage a's tasks first; the push replaced its copies
        for name in (f"a/completions/task_{t:05d}.json", f"a/data/{t}.txt"):
            assert (host_run[0] / name).read_bytes() == (run / name).read_bytes()
    lines = (Path.home() / ".ssh" / "google_compute_known_hosts").read_text().split("\n")
    assert all(ln.startswith("tpu.") for ln in lines if ln), lines


def test_changed_host_key_of_a_worker_refused_on_the_sftp_pull_and_the_push(ns, tpu, tmp_path):
    """storage=sync on ef-tpu-badkey (worker 1's line in gcloud's known_hosts holds
    another key): the SFTP connection of the pulls to worker 1 is refused with the
    fingerprint it offered and the one recorded under its alias, and the fix; so is the
    rsync push (OpenSSH under the same alias); worker 0 connects. The ssh of each worker
    comes from the real gcloud's dry run, which connects to nothing."""
    cfg = _cfg(ns, BADKEY, storage="sync", workdir=str(tmp_path / "w{worker}"))
    launcher = TpuVmLauncher(cfg, echo=False)
    w0, w1 = launcher.workers()
    launcher._derive_ssh([w0, w1])
    assert w1.sftp_host is not None and w1.login is not None and w1.push is not None
    assert w1.sftp_host.host_key_alias == f"tpu.{IDS[BADKEY]}-1"
    real = subprocess.run(
        ["ssh-keygen", "-lf", str(ns.host_pub_key("n2"))], capture_output=True, text=True
    ).stdout.split()[1]
    with pytest.raises(HostKeyError) as err:
        connect(w1.sftp_host, w1.login)
    msg = str(err.value)
    assert f"host {BADKEY}/w1" in msg and f"tpu.{IDS[BADKEY]}-1 CHANGED" in msg, msg
    assert real in msg and "google_compute_known_hosts" in msg, msg
    assert f"ssh-keygen -R tpu.{IDS[BADKEY]}-1" in msg and "a=tpu." in msg, msg
    assert w0.sftp_host is not None and w0.login is not None
    with connect(w0.sftp_host, w0.login) as conn:
        assert conn.exec(["echo", "ok"]).stdout == b"ok\n"
    (tmp_path / "run").mkdir()
    push = subprocess.run(
        w1.push(str(tmp_path / "run"), str(tmp_path / "w1" / "runs" / "r")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert push.returncode != 0
    refused = launcher._host_key_error(w1, push.stderr)
    assert refused is not None and "differs from known_hosts" in str(refused), push.stderr
    assert real in str(refused) and not (tmp_path / "w1" / "runs").exists()


def test_sync_dry_run_prints_the_rsync_over_the_ssh_gcloud_prints(ns, tpu, tmp_path, capsys):
    """--dry-run with storage=sync and code_sync=rsync: gcloud's dry run is asked for each
    worker's ssh (it connects to nothing), and the code and run-dir rsyncs printed use it:
    the worker's address and port, host keys checked under its alias in gcloud's
    known_hosts; the starts still go through gcloud."""
    cfg = _cfg(ns, TPU, storage="sync", code_sync="rsync", workdir=str(tmp_path / "w{worker}"))
    cfg.run.name = "dry"
    spec = StageSpec("a", "embed", JOB, "a", ARRAY, 2, "h")
    TpuVmLauncher(cfg).launch(RunPaths(str(tmp_path / "dry")), Plan([spec], 0), dry_run=True)
    out = capsys.readouterr().out
    known = Path.home() / ".ssh" / "google_compute_known_hosts"
    for i, h in enumerate(NS):
        rsyncs = [ln for ln in out.splitlines() if ln.startswith("$ ") and " rsync " in ln + " "]
        mine = [ln for ln in rsyncs if f"{ns.address(h)}:{tmp_path}/w{i}" in ln]
        assert len(mine) == 2, out  # the code, then the run dir (w{i}/runs/dry)
        assert all(
            f"HostKeyAlias=tpu.{IDS[TPU]}-{i}" in ln and f"UserKnownHostsFile={known}" in ln
            and "StrictHostKeyChecking=yes" in ln and f"-p {ns.port}" in ln
            for ln in mine
        ), mine  # fmt: skip
        assert f"{ns.address(h)}:{tmp_path}/w{i}/runs/dry/" in mine[1], mine
    assert out.count(f"tpu-vm ssh {ns.env['EF_NS_USER']}@{TPU} --worker=") >= 2, out
    assert not (tmp_path / "w0").exists() and not (tmp_path / "dry" / "a").exists()


@pytest.mark.parametrize(
    ("flags", "api"),
    [({"internal_ip": True}, "/v2/"), ({"tunnel_through_iap": True}, "/v2alpha1/")],
    ids=["internal_ip", "tunnel_through_iap"],
)
def test_real_gcloud_takes_the_connection_options(ns, tpu, flags, api):
    """The argv of cluster.tpu_vm.internal_ip / tunnel_through_iap is one the real gcloud
    parses (gcloud 528 has --tunnel-through-iap for TPU VMs only in its alpha track, which
    reads the node from the v2alpha1 API): it reads the node. An IAP tunnel cannot exist
    here (gcloud then wants the workers' guest attributes, which the fake API does not
    serve): the IAP run ends there, never at the argument parser."""
    cfg = _cfg(ns, TPU)
    cfg.cluster.tpu_vm.update(flags)
    TpuVmLauncher(cfg)  # accepted
    target = TpuTarget(TPU, 0, ZONE, PROJECT, ns.env["EF_NS_USER"], ns.key,
                       ssh_flags=(f"-p {ns.port}",), **flags)  # fmt: skip
    before = len(tpu.seen("GET", f"^{api}.*/nodes/{TPU}$"))
    p = subprocess.run(gcloud_ssh_dry_run_argv(target), capture_output=True, text=True, timeout=180)
    assert "unrecognized arguments" not in p.stderr, p.stderr
    assert len(tpu.seen("GET", f"^{api}.*/nodes/{TPU}$")) > before, p.stderr
    if "internal_ip" in flags:
        assert p.returncode == 0, p.stderr
        assert f"@{ns.address(NS[0])}" in p.stdout  # the worker's networkEndpoint
    else:
        assert "unable to connect to this TPU using IAP" in p.stderr, p.stderr
    bad = _cfg(ns, TPU)
    bad.cluster.tpu_vm.update({"internal_ip": True, "tunnel_through_iap": True})
    with pytest.raises(ConfigError, match="exclude each other"):
        TpuVmLauncher(bad)
