"""How to log in to a host: a key file, ssh-agent, or a password read from an environment
variable or from a credentials file the user names.

A credentials file is the seed's JSON ``{"address": ..., "username": ..., "password":
...}`` (or ``"key_file"`` instead of the password); it must be readable by its owner only
(mode 600), or it is refused with the ``chmod 600`` fix. A password lives only in the
``Login`` object in memory: it is never in a message, a log, a marker or a config (its
``repr`` hides it, and errors name where it came from, never what it is).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lib.remote.errors import CredentialsError

METHODS = ("key_file", "agent", "password_env", "credentials_file")


@dataclass(frozen=True)
class Login:
    """Who logs in and how. ``method`` says it in words, for messages ("password from
    $SYNC_PW", "key file ~/.ssh/id_ed25519", "ssh-agent")."""

    username: str
    method: str
    key_file: str | None = None
    agent: bool = False
    password: str | None = field(default=None, repr=False)
    address: str | None = None  # from a credentials file, when the config has none
    port: int | None = None

    def secrets(self) -> list[str]:
        """What must never appear in text (for ``lib.config.redact.mask``)."""
        return [self.password] if self.password else []


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def check_private(path: Path, what: str) -> None:
    """Refuse ``path`` unless only its owner may read or write it (``CredentialsError``
    with the ``chmod 600`` fix)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"{what} {path} is readable or writable by others (mode {mode:04o}); it holds a "
            f"secret: run `chmod 600 {path}` (and check who could have read it)"
        )


def read_credentials_file(path: Path, where: str) -> dict:
    """The JSON object of a credentials file, after the mode check. Raises
    ``CredentialsError`` naming the file (never quoting its content)."""
    if not path.is_file():
        raise CredentialsError(f"{where}: credentials_file {path} does not exist")
    check_private(path, f"{where}: credentials_file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        kind = type(exc).__name__
        raise CredentialsError(
            f"{where}: credentials_file {path} is not a readable JSON object ({kind}); "
            'expected {"address": ..., "username": ..., "password": ...} or "key_file" '
            "instead of the password"
        ) from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{where}: credentials_file {path} must hold a JSON object")
    return data


def _key_login(username: str, key_file: str, method: str, where: str, **extra) -> Login:
    path = _expand(key_file)
    if not path.is_file():
        raise CredentialsError(f"{where}: key file {path} does not exist ({method})")
    return Login(username=username, method=method, key_file=str(path), **extra)


def resolve_login(
    where: str,
    username: str | None,
    *,
    key_file: str | None = None,
    agent: bool = False,
    password_env: str | None = None,
    credentials_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Login:
    """The ``Login`` of one host from exactly one method. ``where`` names the host in
    messages ("sync source h1"). Raises ``CredentialsError``: no method or several, a
    missing key file, an unset variable, a credentials file that is missing, unreadable,
    not mode 600 or without a username/password/key_file."""
    environ = os.environ if environ is None else environ
    given = [
        name
        for name, value in (
            ("key_file", key_file),
            ("agent", agent),
            ("password_env", password_env),
            ("credentials_file", credentials_file),
        )
        if value
    ]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise CredentialsError(
            f"{where}: set exactly one way to log in: key_file: PATH, agent: true, "
            f"password_env: VARIABLE (the password in that environment variable) or "
            f"credentials_file: PATH (JSON, mode 600) ({found})"
        )
    if credentials_file:
        path = _expand(credentials_file)
        data = read_credentials_file(path, where)
        user = username or data.get("username")
        if not user:
            raise CredentialsError(
                f"{where}: no username: set it in the config or in credentials_file {path}"
            )
        extra = {
            "address": data.get("address") or None,
            "port": int(data["port"]) if data.get("port") else None,
        }
        if data.get("key_file"):
            return _key_login(
                str(user),
                str(data["key_file"]),
                f"key file {data['key_file']} (from credentials file {path})",
                where,
                password=data.get("password") or None,  # the key's passphrase, if any
                **extra,
            )
        if not data.get("password"):
            raise CredentialsError(
                f"{where}: credentials_file {path} has neither password nor key_file"
            )
        return Login(
            username=str(user),
            method=f"password from credentials file {path}",
            password=str(data["password"]),
            **extra,
        )
    if not username:
        raise CredentialsError(f"{where}: username is not set")
    if key_file:
        return _key_login(username, key_file, f"key file {key_file}", where)
    if agent:
        if not environ.get("SSH_AUTH_SOCK"):
            raise CredentialsError(
                f"{where}: agent: true, but SSH_AUTH_SOCK is not set: start ssh-agent and "
                "ssh-add your key in the shell you launch from (or use key_file: PATH)"
            )
        return Login(username=username, method="ssh-agent", agent=True)
    assert password_env
    if password_env not in environ:
        raise CredentialsError(
            f"{where}: password_env: {password_env} is not set; export {password_env}=... "
            "in the shell you launch from (it is read from the environment, never written), "
            "or use credentials_file: PATH"
        )
    return Login(
        username=username, method=f"password from ${password_env}", password=environ[password_env]
    )
