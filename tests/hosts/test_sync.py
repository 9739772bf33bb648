"""The sync stage end to end through launch.py, against the real sshd test hosts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lib.remote.credentials import resolve_login
from lib.remote.ssh import Host, connect
from lib.sync.listing import RemoteListingError, list_matches
from tests.conftest import kill_task_when, run_launch, start_launch
from tests.hosts.conftest import source_override, write_files

PW_VAR = "EF_TEST_SYNC_PW"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _marker(run: Path, task: int) -> dict:
    return json.loads((run / "sync" / "completions" / f"task_{task:05d}.json").read_text())


def _source(hosts, name, host, remote_dir, patterns, **auth):
    return {
        "name": name,
        "address": hosts.address(host),
        "port": hosts.port,
        "remote_dir": str(remote_dir),
        "patterns": patterns,
        "known_hosts": hosts.known_hosts,
        **auth,
    }


def _launch(root: Path, name: str, sources: list[dict], *extra: str, env=None):
    return run_launch(
        "sync", f"run.root={root}", f"run.name={name}", source_override(sources), *extra,
        env=env, timeout=300,
    )  # fmt: skip


def test_two_hosts_verified_rerun_skips_redownloads_changed_reports_vanished(ssh_hosts, tmp_path):
    a, b = ssh_hosts.data_dir("two-a"), ssh_hosts.data_dir("two-b")
    files_a = {f"shards/cluster0_gpu{g}.pkl": os.urandom(300_000 + g) for g in range(3)}
    files_b = {f"cluster1_gpu{g}.pkl": os.urandom(200_000 + g) for g in range(2)}
    write_files(a, {**files_a, "shards/notes.txt": b"not matched"})
    # h2 logs in SFTP-only: its sha256 comes from the manifest beside the files, an
    # embedfleet-style completion marker naming them with their sha256.
    manifest = {
        "outputs": [{"path": k, "bytes": len(v), "sha256": _sha(v)} for k, v in files_b.items()]
    }
    write_files(b, {**files_b, "completions/task_00000.json": json.dumps(manifest).encode()})
    sources = [
        _source(ssh_hosts, "h1", "h1", a, ["shards/cluster*_gpu*.pkl"], username=ssh_hosts.user, key_file=ssh_hosts.key),
        _source(ssh_hosts, "h2", "h2", b, ["cluster*_gpu*.pkl"], username=ssh_hosts.sftp_user, password_env=PW_VAR),
    ]  # fmt: skip
    env = {PW_VAR: ssh_hosts.password}
    first = _launch(tmp_path, "two", sources, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "two"
    for rel, data in files_a.items():
        assert (run / "sync/h1" / rel).read_bytes() == data
    for rel, data in files_b.items():
        assert (run / "sync/h2" / rel).read_bytes() == data
    assert not (run / "sync/h1/shards/notes.txt").exists()
    m1, m2 = _marker(run, 0), _marker(run, 1)
    assert m1["extra"]["verification"] == ["remote-sha256"]
    assert m2["extra"]["verification"] == ["manifest"]
    assert {o["path"]: o["sha256"] for o in m1["outputs"]} == {
        f"sync/h1/{k}": _sha(v) for k, v in files_a.items()
    }
    entry = m1["extra"]["files"]["shards/cluster0_gpu0.pkl"]
    assert entry["remote_path"] == str(a / "shards/cluster0_gpu0.pkl")
    assert entry["remote_mtime"] == int((a / "shards/cluster0_gpu0.pkl").stat().st_mtime)
    assert "verified by manifest" in first.stdout

    # The host's copies change: one truncated, one gone, one new.
    changed = a / "shards/cluster0_gpu1.pkl"
    changed.write_bytes(files_a["shards/cluster0_gpu1.pkl"][:1000])
    os.utime(changed, (time.time() + 5, time.time() + 5))
    (b / "cluster1_gpu1.pkl").unlink()
    write_files(a, {"shards/cluster0_gpu3.pkl": b"new shard"})
    second = _launch(tmp_path, "two", sources, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    m1 = _marker(run, 0)
    assert m1["counts"]["downloaded"] == 2 and m1["counts"]["skipped"] == 2
    assert (run / "sync/h1/shards/cluster0_gpu1.pkl").read_bytes() == changed.read_bytes()
    assert (run / "sync/h1/shards/cluster0_gpu3.pkl").read_bytes() == b"new shard"
    assert _marker(run, 1)["extra"]["vanished"] == ["cluster1_gpu1.pkl"]
    assert (run / "sync/h2/cluster1_gpu1.pkl").read_bytes() == files_b["cluster1_gpu1.pkl"]
    assert "no longer on the host (kept here, not deleted): cluster1_gpu1.pkl" in second.stdout

    # The password is nowhere: not in the run dir (run.yaml, plan, markers, records,
    # logs), not on the console.
    secret = ssh_hosts.password.encode()
    leaks = [p for p in run.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaks == []
    assert ssh_hosts.password not in first.stdout + first.stderr + second.stdout + second.stderr


def test_no_match_and_missing_remote_dir_list_what_is_there(ssh_hosts, tmp_path):
    d = ssh_hosts.data_dir("nomatch")
    write_files(d, {"shard_00000.safetensors": b"x", "sub/y.bin": b"y"})
    login = {"username": ssh_hosts.user, "key_file": ssh_hosts.key}
    out = _launch(tmp_path, "nm", [_source(ssh_hosts, "h1", "h1", d, ["*.pkl"], **login)])
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert f"no file under {d} matches ['*.pkl']" in text
    assert "shard_00000.safetensors, sub/" in text
    # A missing remote_dir, asked directly (one launch is enough for the path through it).
    host = Host(ssh_hosts.address("h1"), ssh_hosts.port, "src", ssh_hosts.known_hosts)
    missing = f"remote_dir {d / 'nope'} does not exist"
    with (
        connect(host, resolve_login("src", **login)) as conn,
        pytest.raises(RemoteListingError, match=missing) as err,
    ):
        list_matches(conn.sftp(), str(d / "nope"), ["*"], "sync source h1")
    assert d.name in str(err.value)  # the parent's entries are listed


def test_killed_download_resumes_from_its_part_with_the_right_sha256(ssh_hosts, tmp_path):
    d = ssh_hosts.data_dir("resume")
    size = 48 << 20
    with open(d / "big.bin", "wb") as fh:
        subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=fh, check=True)
    (d / "big.bin").chmod(0o644)
    want = hashlib.sha256((d / "big.bin").read_bytes()).hexdigest()
    src = [
        _source(
            ssh_hosts, "h1", "h1", d, ["big.bin"], username=ssh_hosts.user, key_file=ssh_hosts.key
        )
    ]
    run = tmp_path / "res"
    part = run / "sync/h1/big.bin.part"

    proc = start_launch("sync", f"run.root={tmp_path}", "run.name=res", source_override(src))
    try:
        killed = kill_task_when(
            proc,
            run / "sync/attempts/task_00000.json",
            lambda: part.exists() and part.stat().st_size > (4 << 20),
            timeout=120,
        )
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, proc.stdout.read() if proc.stdout else ""
    kept = part.stat().st_size
    assert 0 < kept < size and not (run / "sync/h1/big.bin").exists()
    again = _launch(tmp_path, "res", src)
    assert again.returncode == 0, again.stdout + again.stderr
    m = _marker(run, 0)
    assert m["outputs"][0]["sha256"] == want
    assert hashlib.sha256((run / "sync/h1/big.bin").read_bytes()).hexdigest() == want
    resumed_from = m["extra"]["resumed"]["big.bin"]
    assert resumed_from >= kept and m["counts"]["transferred_bytes"] == size - resumed_from
    log = (run / "sync/logs/task_00000.log").read_text()
    assert f"resumed big.bin from byte {resumed_from} of {size}" in log
    assert not part.exists()


def test_disk_full_publishes_nothing_and_keeps_the_part(ssh_hosts, tmp_path):
    d = ssh_hosts.data_dir("full")
    write_files(d, {"a.bin": os.urandom(3 << 20)})
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)])
    if mount.returncode != 0:
        if os.environ.get("CI") == "true" or os.geteuid() == 0:
            pytest.fail("cannot mount a 1 MiB tmpfs for the disk-full test")
        pytest.skip("needs root to mount a small tmpfs")
    try:
        src = [
            _source(
                ssh_hosts, "h1", "h1", d, ["a.bin"], username=ssh_hosts.user, key_file=ssh_hosts.key
            )
        ]
        out = _launch(tmp_path, "full", src, f"sync.dest={small}")
        assert out.returncode != 0
        text = out.stdout + out.stderr
        assert "disk full writing" in text and "the .part is kept" in text
        assert (small / "h1/a.bin.part").exists() and not (small / "h1/a.bin").exists()
        assert not (tmp_path / "full/sync/completions/task_00000.json").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)
