"""What can go wrong reaching a remote host; every message names the host and the fix."""

from __future__ import annotations

from lib.core.errors import EmbedfleetError


class RemoteError(EmbedfleetError):
    """A remote host cannot be reached, verified, logged into or read."""


class HostKeyError(RemoteError):
    """The host's key is not in known_hosts, or differs from the one recorded there."""


class RemoteConnectError(RemoteError):
    """The TCP connection or the SSH handshake failed (refused, timed out, no route)."""


class RemoteAuthError(RemoteError):
    """The host refused the login (the message says which method was tried)."""


class CredentialsError(RemoteError):
    """The credentials named in the config are missing, unreadable or too open."""
