"""One SSH connection to a host: connect with verified host keys, run a command, open SFTP.

``connect`` uses paramiko's ``SSHClient`` with the host keys of a known_hosts file and a
policy that refuses unknown hosts (``lib.remote.known_hosts``); never fsspec's
``SFTPFileSystem``, which adds unknown keys by default and cannot load a custom
known_hosts in its reject mode. Errors name the host (address:port), what failed and a
command to try by hand; they never hold a password.

Channels get large windows (``WINDOW_BYTES``): with paramiko's 2 MiB default a
transfer stalls on window adjustments long before the network is busy.
"""

from __future__ import annotations

import logging
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import paramiko

from lib.remote.credentials import Login
from lib.remote.errors import HostKeyError, RemoteAuthError, RemoteConnectError, RemoteError
from lib.remote.known_hosts import (
    VerifyingPolicy,
    changed_key_message,
    host_key_name,
    known_hosts_path,
    load_host_keys,
)

# paramiko logs every login and channel at INFO: noise in a task's log.
logging.getLogger("paramiko").setLevel(logging.WARNING)

WINDOW_BYTES = 64 << 20
MAX_PACKET_BYTES = 1 << 15  # paramiko's and OpenSSH's usual maximum packet payload


@dataclass(frozen=True)
class Host:
    """Where to connect. ``label`` names it in messages ("sync source h1")."""

    address: str
    port: int = 22
    label: str = ""
    known_hosts: str | None = None  # default ~/.ssh/known_hosts
    trust_on_first_use: bool = False
    connect_timeout: float = 15.0
    ciphers: tuple[str, ...] = ()  # preferred first; () = paramiko's order
    tofu_hint: str = ""  # appended to an unknown-host message (how to trust on first use)
    # The name its key is recorded under in known_hosts (OpenSSH's HostKeyAlias, e.g.
    # gcloud's tpu.NODE_ID-WORKER); None: the address ([address]:port off port 22).
    host_key_alias: str | None = None

    @property
    def name(self) -> str:
        return f"{self.address}:{self.port}"

    def where(self) -> str:
        return f"{self.label} ({self.name})" if self.label else self.name


@dataclass(frozen=True)
class ExecResult:
    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes


def by_hand(host: Host, username: str) -> str:
    """The command that tries the same connection by hand."""
    return shlex.join(["ssh", "-p", str(host.port), f"{username}@{host.address}"])


def _disabled_ciphers(transport_ciphers: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """Ciphers to disable so that ``preferred`` (those paramiko knows) are negotiated first:
    paramiko offers its ciphers in a fixed order, so the ones not preferred are dropped."""
    keep = [c for c in preferred if c in transport_ciphers]
    return [c for c in transport_ciphers if c not in keep] if keep else []


def connect(host: Host, login: Login) -> Connection:
    """An authenticated ``Connection`` to ``host``. Raises ``HostKeyError`` (unknown or
    changed key), ``RemoteConnectError`` (refused, timed out, handshake failed),
    ``RemoteAuthError`` (login refused: names ``login.method``)."""
    path = known_hosts_path(host.known_hosts)
    where = host.where()
    alias = host.host_key_alias
    at = (host.address, host.port) if alias else None
    client = paramiko.SSHClient()
    load_host_keys(path)  # a file that cannot be parsed is refused with its name
    if path.exists():
        client.load_host_keys(str(path))
    client.set_missing_host_key_policy(
        VerifyingPolicy(path, where, host.trust_on_first_use, host.tofu_hint, at)
    )
    disabled = _disabled_ciphers(paramiko.Transport._preferred_ciphers, host.ciphers)
    sock: socket.socket | None = None

    def close() -> None:  # the client, and the socket made for an alias (if unowned yet)
        client.close()
        if sock is not None:
            sock.close()

    try:
        if alias:
            # paramiko looks the key up under the name it connects to (port 22: no
            # [name]:port): the TCP connection is made here and the alias passed as that
            # name, as OpenSSH's HostKeyAlias does.
            sock = socket.create_connection((host.address, host.port), host.connect_timeout)
        client.connect(
            alias or host.address,
            port=22 if alias else host.port,
            sock=sock,
            username=login.username,
            password=login.password if not login.key_file else None,
            passphrase=login.password if login.key_file else None,
            key_filename=login.key_file,
            allow_agent=login.agent,
            look_for_keys=False,
            timeout=host.connect_timeout,
            banner_timeout=host.connect_timeout,
            auth_timeout=host.connect_timeout,
            disabled_algorithms={"ciphers": disabled} if disabled else None,
        )
    except HostKeyError:
        close()
        raise
    except paramiko.BadHostKeyException as exc:
        close()
        name = alias or host_key_name(host.address, host.port)
        raise HostKeyError(
            changed_key_message(where, name, exc.key, exc.expected_key, path, at)
        ) from None
    except paramiko.PasswordRequiredException:
        close()
        raise RemoteAuthError(
            f"{where}: key file {login.key_file} is encrypted: add it to ssh-agent (ssh-add "
            f"{login.key_file}) and log in with agent: true"
        ) from None
    except paramiko.AuthenticationException as exc:
        close()
        raise RemoteAuthError(
            f"{where}: authentication failed for user {login.username} with "
            f"{login.method} ({type(exc).__name__}); check the username and that method, "
            f"then try by hand: {by_hand(host, login.username)}"
        ) from None
    except TimeoutError as exc:
        close()
        raise RemoteConnectError(
            f"{where}: connecting to {host.name} timed out after {host.connect_timeout:g} s "
            f"({exc or 'no answer'}); check the address, the port and any firewall or VPN, "
            f"then try by hand: {by_hand(host, login.username)}"
        ) from None
    except (paramiko.SSHException, OSError) as exc:
        close()
        reason = _reason(exc)
        raise RemoteConnectError(
            f"{where}: cannot connect to {host.name} ({reason}); check that sshd runs there "
            f"and listens on port {host.port}, then try by hand: {by_hand(host, login.username)}"
        ) from None
    transport = client.get_transport()
    assert transport is not None
    transport.default_window_size = WINDOW_BYTES
    transport.default_max_packet_size = MAX_PACKET_BYTES
    transport.set_keepalive(30)
    return Connection(client, transport, host, login)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        errors = list(exc.errors.values())
        if errors and all(isinstance(e, ConnectionRefusedError) for e in errors):
            return "connection refused"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


class Connection:
    """An authenticated SSH connection: ``exec`` a command, open ``sftp``, ``close``."""

    def __init__(
        self, client: paramiko.SSHClient, transport: paramiko.Transport, host: Host, login: Login
    ) -> None:
        self.client, self.transport, self.host, self.login = client, transport, host, login

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def sftp(self) -> paramiko.SFTPClient:
        """An SFTP session on this connection (large window). Raises ``RemoteError`` when
        the host refuses the sftp subsystem."""
        try:
            sftp = paramiko.SFTPClient.from_transport(
                self.transport, window_size=WINDOW_BYTES, max_packet_size=MAX_PACKET_BYTES
            )
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteError(
                f"{self.host.where()}: the host refused SFTP ({exc}); it needs `Subsystem "
                "sftp internal-sftp` (or sftp-server) in its sshd_config"
            ) from None
        if sftp is None:
            raise RemoteError(f"{self.host.where()}: could not open an SFTP session")
        return sftp

    def exec(self, argv: Sequence[str], timeout: float = 120.0) -> ExecResult:
        """Run ``argv`` on the host (quoted with ``shlex.join``; stdin closed at once) and
        return its status and output. Raises ``RemoteError`` when the channel cannot open
        or the command runs past ``timeout`` seconds."""
        command = shlex.join(argv)
        try:
            channel = self.transport.open_session(window_size=WINDOW_BYTES)
            channel.settimeout(timeout)
            channel.exec_command(command)
            channel.shutdown_write()
            # Outputs here are small (checksums, listings); the large window keeps stderr
            # from blocking while stdout is read.
            stdout = channel.makefile("rb").read()
            stderr = channel.makefile_stderr("rb").read()
            status = channel.recv_exit_status()
            channel.close()
        except TimeoutError:
            raise RemoteError(
                f"{self.host.where()}: `{command}` did not finish within {timeout:g} s"
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteError(f"{self.host.where()}: cannot run `{command}`: {exc}") from None
        return ExecResult(tuple(argv), status, stdout, stderr)
