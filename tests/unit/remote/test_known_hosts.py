"""Host-key fingerprints and known_hosts lines, checked against OpenSSH's own tools."""

from __future__ import annotations

import subprocess

import paramiko

from lib.remote.known_hosts import add_host_key, fingerprint, host_key_name, keyscan_fix


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    printed = subprocess.run(
        ["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert fingerprint(paramiko.Ed25519Key.from_private_key_file(str(key))) == printed


def test_added_key_is_read_back_by_ssh_keygen(tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key))
    kh = tmp_path / "dir" / "known_hosts"
    add_host_key(kh, host_key_name("10.0.0.5", 2222), pkey)
    assert oct(kh.stat().st_mode & 0o777) == "0o600"
    found = subprocess.run(
        ["ssh-keygen", "-F", "[10.0.0.5]:2222", "-f", str(kh)], capture_output=True, text=True
    )
    assert found.returncode == 0 and pkey.get_base64() in found.stdout
    assert host_key_name("h", 22) == "h"
    assert keyscan_fix("h", 2222, kh) == f"ssh-keyscan -p 2222 h >> {kh}"
