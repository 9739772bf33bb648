"""lib.remote against real OpenSSH sshd hosts: logins, host keys, exec, SFTP-only."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import pytest

from lib.remote.credentials import resolve_login
from lib.remote.errors import CredentialsError, HostKeyError, RemoteAuthError, RemoteConnectError
from lib.remote.ssh import Host, connect
from lib.sync.verify import ExecUnavailable, remote_sha256


def _host(hosts, name="h1", **kw) -> Host:
    kw.setdefault("known_hosts", hosts.known_hosts)
    return Host(hosts.address(name), hosts.port, label=f"test {name}", **kw)


def _ssh_keygen_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    return out.stdout.split()[1]  # "256 SHA256:... comment (ED25519)"


def test_key_login_exec_quotes_its_argv_and_sftp_reads(ssh_hosts, tmp_path):
    data = ssh_hosts.data_dir("exec")
    odd = data / "a file; echo pwned"
    odd.write_bytes(b"hello")
    odd.chmod(0o644)
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    with connect(_host(ssh_hosts), login) as conn:
        result = conn.exec(["sha256sum", "--", str(odd)])
        assert result.status == 0
        assert result.stdout.split()[0].decode() == hashlib.sha256(b"hello").hexdigest()
        assert b"pwned" not in result.stdout.split(b"  ")[0]
        sftp = conn.sftp()
        assert sftp.listdir(str(data)) == [odd.name]


def test_password_logins_from_env_and_from_credentials_file(ssh_hosts, tmp_path):
    env = {"EF_TEST_SSH_PW": ssh_hosts.password}
    by_env = resolve_login("t", ssh_hosts.user, password_env="EF_TEST_SSH_PW", environ=env)
    creds = tmp_path / "h2.credentials"
    creds.write_text(
        json.dumps(
            {
                "address": ssh_hosts.address("h2"),
                "username": ssh_hosts.user,
                "password": ssh_hosts.password,
            }
        )
    )
    creds.chmod(0o600)
    by_file = resolve_login("t", None, credentials_file=str(creds))
    assert by_file.address == ssh_hosts.address("h2") and by_file.username == ssh_hosts.user
    assert ssh_hosts.password not in repr(by_file)
    for login, host in ((by_env, "h1"), (by_file, "h2")):
        with connect(_host(ssh_hosts, host), login) as conn:
            assert conn.exec(["id", "-un"]).stdout.strip().decode() == ssh_hosts.user


def test_wrong_password_names_the_method_never_the_password(ssh_hosts):
    login = resolve_login("t", ssh_hosts.user, password_env="PW", environ={"PW": "not-it-9f8e7d"})
    with pytest.raises(RemoteAuthError) as err:
        connect(_host(ssh_hosts), login)
    msg = str(err.value)
    assert "authentication failed" in msg and "password from $PW" in msg
    assert f"ssh -p {ssh_hosts.port} {ssh_hosts.user}@{ssh_hosts.address('h1')}" in msg
    assert "not-it-9f8e7d" not in msg


def test_credentials_file_readable_by_others_is_refused(tmp_path):
    creds = tmp_path / "c.credentials"
    creds.write_text(json.dumps({"username": "u", "password": "s3cret-xyz"}))
    creds.chmod(0o644)
    with pytest.raises(CredentialsError) as err:
        resolve_login("sync source h1", None, credentials_file=str(creds))
    assert f"chmod 600 {creds}" in str(err.value) and "0644" in str(err.value)
    assert "s3cret-xyz" not in str(err.value)


def test_unknown_host_key_is_refused_with_its_fingerprint_and_the_fix(ssh_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    with pytest.raises(HostKeyError) as err:
        connect(_host(ssh_hosts, known_hosts=str(empty)), login)
    msg = str(err.value)
    assert _ssh_keygen_fingerprint(ssh_hosts.host_pub_key("h1")) in msg
    assert f"ssh-keyscan -p {ssh_hosts.port} {ssh_hosts.address('h1')} >> {empty}" in msg
    assert empty.read_text() == ""  # nothing was added


def test_changed_host_key_is_refused_even_with_trust_on_first_use(ssh_hosts, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    name = f"[{ssh_hosts.address('h1')}]:{ssh_hosts.port}"
    kh.write_text(f"{name} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    with pytest.raises(HostKeyError) as err:
        connect(_host(ssh_hosts, known_hosts=str(kh), trust_on_first_use=True), login)
    msg = str(err.value)
    assert "CHANGED" in msg
    assert _ssh_keygen_fingerprint(Path(f"{other}.pub")) in msg  # what was recorded
    assert _ssh_keygen_fingerprint(ssh_hosts.host_pub_key("h1")) in msg  # what is offered
    assert f"ssh-keygen -R '{name}' -f {kh}" in msg


def test_trust_on_first_use_adds_the_key_and_says_so(ssh_hosts, tmp_path, caplog):
    kh = tmp_path / "sub" / "known_hosts"
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    with (
        caplog.at_level(logging.WARNING),
        connect(_host(ssh_hosts, "h2", known_hosts=str(kh), trust_on_first_use=True), login),
    ):
        pass
    assert "trust_on_first_use" in caplog.text and str(kh) in caplog.text
    recorded = kh.read_text().split()
    assert recorded[0] == f"[{ssh_hosts.address('h2')}]:{ssh_hosts.port}"
    assert recorded[1:3] == ssh_hosts.host_pub_key("h2").read_text().split()[:2]
    with connect(_host(ssh_hosts, "h2", known_hosts=str(kh)), login):  # now known, no TOFU
        pass


def test_sftp_only_account_cannot_exec(ssh_hosts):
    login = resolve_login("t", ssh_hosts.sftp_user, key_file=ssh_hosts.key)
    with connect(_host(ssh_hosts), login) as conn:
        with pytest.raises(ExecUnavailable):
            remote_sha256(conn, "/etc/hostname")
        assert conn.sftp().stat("/etc/hostname").st_size > 0


def test_connection_refused_names_address_port_and_the_command_to_try(ssh_hosts):
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    host = Host(ssh_hosts.address("h1"), 1, label="test h1", known_hosts=ssh_hosts.known_hosts)
    with pytest.raises(RemoteConnectError) as err:
        connect(host, login)
    msg = str(err.value)
    assert f"{ssh_hosts.address('h1')}:1" in msg and "connection refused" in msg
    assert f"ssh -p 1 {ssh_hosts.user}@{ssh_hosts.address('h1')}" in msg


def test_host_key_alias_checks_the_key_recorded_under_the_alias(ssh_hosts, tmp_path):
    """A host looked up under an alias (OpenSSH's HostKeyAlias; gcloud's tpu.NODE_ID-WORKER):
    unknown under it, refused with its fingerprint and a fix that records the key under
    the alias, which then connects (nothing under the address needed); a changed key
    under the alias is refused with both fingerprints; a connection refused still names
    the address and port."""
    alias = "tpu.4242-0"
    kh = tmp_path / "google_compute_known_hosts"
    kh.write_text(f"[{ssh_hosts.address('h1')}]:{ssh_hosts.port} {_pub(ssh_hosts, 'h1')}\n")
    login = resolve_login("t", ssh_hosts.user, key_file=ssh_hosts.key)
    host = _host(ssh_hosts, known_hosts=str(kh), host_key_alias=alias)
    with pytest.raises(HostKeyError) as err:
        connect(host, login)  # the address's line does not count
    msg = str(err.value)
    assert f"the host key of {alias} " in msg
    assert _ssh_keygen_fingerprint(ssh_hosts.host_pub_key("h1")) in msg
    fix = msg.split("then add it: ", 1)[1]
    assert fix.startswith(f"ssh-keyscan -p {ssh_hosts.port} {ssh_hosts.address('h1')} | awk")
    kh.write_text("")
    subprocess.run(["sh", "-c", fix], check=True, capture_output=True, timeout=60)
    assert {ln.split()[0] for ln in kh.read_text().splitlines()} == {alias}
    with connect(host, login) as conn:
        assert conn.exec(["echo", "ok"]).stdout == b"ok\n"

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh.write_text(f"{alias} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(HostKeyError) as err:
        connect(host, login)
    msg = str(err.value)
    assert f"the host key of {alias} CHANGED" in msg
    assert _ssh_keygen_fingerprint(Path(f"{other}.pub")) in msg
    assert _ssh_keygen_fingerprint(ssh_hosts.host_pub_key("h1")) in msg
    assert f"ssh-keygen -R {alias} -f {kh}" in msg
    closed = Host(ssh_hosts.address("h1"), 1, "test h1", str(kh), host_key_alias=alias)
    with pytest.raises(RemoteConnectError, match=rf"{ssh_hosts.address('h1')}:1 .*refused"):
        connect(closed, login)


def _pub(hosts, name: str) -> str:
    return " ".join(hosts.host_pub_key(name).read_text().split()[:2])
