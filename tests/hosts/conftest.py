"""The test SSH hosts (scripts/hosts/up.sh): real OpenSSH sshd on 127.0.0.2 and 127.0.0.3.

The session fixture starts them when they are not running. If they cannot start, the
tests that need them fail: under CI=true always, elsewhere too when this is root (who
can start them); a non-root developer machine skips them with the reason.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, moto_s3

UP = REPO / "scripts/hosts/up.sh"


@dataclass(frozen=True)
class Hosts:
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.env["EF_HOSTS_PORT"])

    def address(self, host: str) -> str:
        return self.env[f"EF_HOST_{host}"]

    @property
    def user(self) -> str:
        return self.env["EF_HOSTS_USER"]

    @property
    def sftp_user(self) -> str:
        return self.env["EF_HOSTS_SFTP_USER"]

    @property
    def password(self) -> str:
        return self.env["EF_HOSTS_PASSWORD"]

    @property
    def key(self) -> str:
        return self.env["EF_HOSTS_KEY"]

    @property
    def known_hosts(self) -> str:
        return self.env["EF_HOSTS_KNOWN_HOSTS"]

    def host_pub_key(self, host: str) -> Path:
        return Path(self.env["EF_HOSTS_DIR"]) / host / "ssh_host_ed25519_key.pub"

    def hosts_config(self, hosts: list[dict], **multihost):
        """A ``cluster=hosts`` config over the namespace hosts ``hosts`` (each a dict with
        ``name`` and optional ``slots``/``env``), the test user's key and known_hosts, short
        timeouts; ``multihost`` overrides ``cluster.multihost`` keys."""
        from omegaconf import OmegaConf

        from lib.config.schema import EmbedfleetConfig

        entries = [{"address": self.address(h["name"]), "port": self.port, **h} for h in hosts]
        return OmegaConf.merge(
            OmegaConf.structured(EmbedfleetConfig),
            {
                "cluster": {
                    "launcher": "hosts",
                    "hosts": entries,
                    "multihost": {
                        "user": self.env["EF_NS_USER"],
                        "key_file": self.key,
                        "known_hosts": self.known_hosts,
                        "connect_timeout_s": 2,
                        "poll_s": 0.2,
                        **multihost,
                    },
                }
            },
        )

    def hosts_overrides(self, names) -> list[str]:
        """The launch.py overrides of ``hosts_config`` for hosts ``names`` (one slot each)."""
        hosts = ", ".join(
            f"{{address: {self.address(h)}, port: {self.port}, name: {h}}}" for h in names
        )
        return [
            "cluster=hosts",
            f"cluster.hosts=[{hosts}]",
            f"cluster.multihost.user={self.env['EF_NS_USER']}",
            f"cluster.multihost.key_file={self.key}",
            f"cluster.multihost.known_hosts={self.known_hosts}",
            "cluster.multihost.connect_timeout_s=2",
            "cluster.multihost.poll_s=0.2",
        ]

    def data_dir(self, name: str) -> Path:
        """A fresh directory the test users can read (the state dir's data/)."""
        d = Path(self.env["EF_HOSTS_DATA"]) / f"{name}-{uuid.uuid4().hex[:8]}"
        d.mkdir(mode=0o755)
        d.chmod(0o755)
        return d


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out[key] = " ".join(shlex.split(value))
    return out


@pytest.fixture(scope="session")
def ssh_hosts() -> Hosts:
    check = subprocess.run([str(UP), "--check"], capture_output=True, text=True)
    if check.returncode != 0:
        up = subprocess.run([str(UP)], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            reason = f"the test SSH hosts could not start (scripts/hosts/up.sh):\n{up.stderr}"
            if os.environ.get("CI") == "true" or os.geteuid() == 0:
                pytest.fail(reason)
            pytest.skip(reason)
    env_file = subprocess.run(
        [str(UP), "--env"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Hosts(parse_env_file(Path(env_file)))


@pytest.fixture(scope="module")
def bridge_s3(ssh_hosts, tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server on the namespace hosts' bridge (.1 of their subnet: n1..n3 cannot
    reach this machine's 127.0.0.1), with fake credentials of its own, unlike any text in
    the tree; yields the environment that points s3fs at it (not set in this process)."""
    first = ssh_hosts.env["EF_NS_HOSTS_NAMES"].split()[0]
    bridge = ssh_hosts.address(first).rsplit(".", 1)[0] + ".1"
    key, secret = f"EFKEY{uuid.uuid4().hex[:12].upper()}", uuid.uuid4().hex + uuid.uuid4().hex
    with moto_s3(tmp_path_factory, bridge, key, secret) as env:
        yield env


def write_files(root: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> content) under ``root``, readable by the users."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == root.parent:
                break
            parent.chmod(0o755)
        path.write_bytes(data)
        path.chmod(0o644)


def source_override(sources: list[dict]) -> str:
    """A Hydra override ``sync.sources=[...]`` for these sources (strings quoted)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v)).replace('"', "'")

    items = ["{" + ", ".join(f"{k}: {value(v)}" for k, v in s.items()) + "}" for s in sources]
    return "sync.sources=[" + ", ".join(items) + "]"
