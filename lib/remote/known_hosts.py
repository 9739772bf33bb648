"""Host keys checked against a known_hosts file: no auto-accept unless asked for by name.

An unknown host, or a host whose key differs from the one recorded, is refused with the
key's type and SHA256 fingerprint (the form ``ssh-keygen -lf`` and ``ssh`` print) and the
fix: check the fingerprint with whoever runs the host, then ``ssh-keyscan -p PORT HOST >>
FILE``. ``trust_on_first_use`` adds an unknown host's key to the file and logs that it
did; a *changed* key is refused even then.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
from pathlib import Path

import paramiko

from lib.remote.errors import HostKeyError

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def known_hosts_path(configured: str | None) -> Path:
    """The known_hosts file to check against: ``configured`` or ``~/.ssh/known_hosts``."""
    return Path(os.path.expanduser(configured or DEFAULT_KNOWN_HOSTS))


def host_key_name(address: str, port: int) -> str:
    """How known_hosts names a host: ``address`` on port 22, else ``[address]:port``."""
    return address if port == 22 else f"[{address}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>`` of the key, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {fingerprint(key)}"


def keyscan_fix(address: str, port: int, path: Path, alias: str | None = None) -> str:
    """The command that appends the host's keys to ``path`` (under ``alias``, the name
    known_hosts records them by, when it has one: OpenSSH's HostKeyAlias)."""
    scan = shlex.join(["ssh-keyscan", "-p", str(port), address])
    if alias:
        scan += " | " + shlex.join(["awk", "-v", f"a={alias}", "{$1 = a; print}"])
    return f"{scan} >> {shlex.quote(str(path))}"


def load_host_keys(path: Path) -> paramiko.HostKeys:
    """The keys recorded in ``path`` (empty when the file does not exist). Raises
    ``HostKeyError`` naming the file when it cannot be read or parsed."""
    keys = paramiko.HostKeys()
    if path.exists():
        try:
            keys.load(str(path))
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise HostKeyError(f"known_hosts file {path} cannot be read: {exc}") from None
    return keys


def _scan_fix(name: str, path: Path, at: tuple[str, int] | None) -> str:
    """``keyscan_fix`` for the known_hosts name ``name``: ``at`` (address, port) when
    ``name`` is an alias of that address, else the address and port in ``name``."""
    if at:
        return keyscan_fix(at[0], at[1], path, alias=name)
    return keyscan_fix(*split_name(name), path)


def unknown_host_message(
    label: str,
    name: str,
    key: paramiko.PKey,
    path: Path,
    hint: str,
    at: tuple[str, int] | None = None,
) -> str:
    """Why a host whose key is not recorded is refused, and the fix. ``name``: the name
    looked up in ``path``; ``at``: the (address, port) it stands for when it is an alias."""
    where = "is not in" if path.exists() else "cannot be checked: there is no file"
    return (
        f"{label}: the host key of {name} ({describe_key(key)}) {where} {path}. Check that "
        "fingerprint with the host's administrator (on the host: ssh-keygen -lf "
        f"/etc/ssh/ssh_host_{key.get_name().removeprefix('ssh-')}_key.pub), then add it: "
        f"{_scan_fix(name, path, at)}{hint}"
    )


def changed_key_message(
    label: str,
    name: str,
    offered: paramiko.PKey,
    recorded: paramiko.PKey,
    path: Path,
    at: tuple[str, int] | None = None,
) -> str:
    """Why a host whose key differs from the recorded one is refused, with both keys'
    fingerprints and the fix (``name``, ``at``: as in ``unknown_host_message``)."""
    remove = shlex.join(["ssh-keygen", "-R", name, "-f", str(path)])
    return (
        f"{label}: the host key of {name} CHANGED: {path} records {describe_key(recorded)}, "
        f"the host now offers {describe_key(offered)}. Someone may be intercepting the "
        "connection, or the host was reinstalled. Nothing was sent to it. If the new key is "
        f"right (ask the host's administrator), replace the old one: {remove}, then "
        f"{_scan_fix(name, path, at)} after checking the fingerprint"
    )


def split_name(name: str) -> tuple[str, int]:
    """``[host]:2222`` -> (host, 2222); ``host`` -> (host, 22)."""
    if name.startswith("[") and "]:" in name:
        host, _, port = name[1:].partition("]:")
        return host, int(port)
    return name, 22


class VerifyingPolicy(paramiko.MissingHostKeyPolicy):
    """What to do with a host whose key is not in known_hosts: refuse (``HostKeyError``
    with the fingerprint and the fix), or with ``trust_on_first_use`` add its key to the
    file and log that it did. (A changed key never gets here: paramiko raises
    ``BadHostKeyException``, which ``lib.remote.ssh`` turns into a ``HostKeyError``.)"""

    def __init__(
        self,
        path: Path,
        label: str,
        trust_on_first_use: bool,
        hint: str = "",
        at: tuple[str, int] | None = None,
    ) -> None:
        self.path, self.label, self.tofu, self.hint = path, label, trust_on_first_use, hint
        self.at = at  # (address, port) when the host is looked up under an alias

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey):
        if not self.tofu:
            raise HostKeyError(
                unknown_host_message(self.label, hostname, key, self.path, self.hint, self.at)
            )
        add_host_key(self.path, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning(
            "%s: trust_on_first_use: added the host key of %s (%s) to %s without checking it",
            self.label,
            hostname,
            describe_key(key),
            self.path,
        )


def add_host_key(path: Path, hostname: str, key: paramiko.PKey) -> None:
    """Append ``hostname``'s ``key`` to the known_hosts file ``path`` (created 0600, its
    directory 0700, when missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
