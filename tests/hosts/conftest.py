"""The test SSH hosts (scripts/hosts/up.sh): real OpenSSH sshd on 127.0.0.2 and 127.0.0.3.

The session fixture starts them when they are not running. If they cannot start, the
tests that need them fail: under CI=true always, elsewhere too when this is root (who
can start them); a non-root developer machine skips them with the reason.

``fake_tpu`` points the real ``gcloud`` CLI at ``tests/hosts/fake_tpu_api.py`` (TPU nodes
whose workers are namespace hosts), for the tests of ``cluster=tpu_vm`` through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, moto_s3
from tests.hosts.fake_tpu_api import FakeNode, FakeTpuApi

UP = REPO / "scripts/hosts/up.sh"


@dataclass(frozen=True)
class Hosts:
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.env["EF_HOSTS_PORT"])

    def address(self, host: str) -> str:
        return self.env[f"EF_HOST_{host}"]

    def need_ns(self, names) -> Hosts:
        """These hosts, once the namespace hosts ``names`` are among those up.sh started."""
        up = self.env.get("EF_NS_HOSTS_NAMES", "").split()
        assert set(names) <= set(up), f"up.sh started namespace hosts {up}, not {sorted(names)}"
        return self

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


# -- cluster=tpu_vm through the real gcloud CLI ------------------------------------------

TPU_PROJECT, TPU_ZONE = "ef-test", "us-central2-b"


def need_gcloud() -> str:
    """The real gcloud CLI's path; a failure (never a skip) when it is not on PATH."""
    gcloud = shutil.which("gcloud")
    version = ""
    if gcloud:
        version = subprocess.run(
            [gcloud, "--version"], capture_output=True, text=True, timeout=120
        ).stdout
    if not gcloud or "Google Cloud SDK" not in version:
        # Never a skip: the machine image carries the Cloud SDK, here and in CI.
        pytest.fail(f"the real gcloud CLI is not on PATH (found {gcloud!r}: {version[:200]!r})")
    return gcloud


def pub_key(path: Path) -> str:
    """``TYPE BASE64`` of a public key file (no comment)."""
    return " ".join(path.read_text().split()[:2])


@dataclass(frozen=True)
class TpuNode:
    """A fake TPU for ``fake_tpu``: its id (gcloud's host-key alias is ``tpu.ID-WORKER``),
    the namespace hosts that are its workers, its state, and the workers whose line in
    gcloud's known_hosts holds another key (as after a worker was recreated)."""

    id: str
    workers: tuple[str, ...]
    state: str = "READY"
    wrong_keys: tuple[int, ...] = ()


@contextlib.contextmanager
def fake_tpu(
    hosts: Hosts, base: Path, nodes: dict[str, TpuNode], *, patch_env: bool = True
) -> Iterator[FakeTpuApi]:
    """The fake TPU API serving ``nodes`` until the block ends, and (``patch_env``) this
    process's environment pointed at it: ``gcloud_env(api, base)``, whose ``HOME`` holds
    gcloud's known_hosts (``~/.ssh/google_compute_known_hosts``: a line per worker under
    its alias, nothing under the workers' addresses). Without ``patch_env`` only the
    commands given that environment see it (a ``run_launch(env=...)``), and the rest of
    the process keeps its HOME (its model cache)."""
    need_gcloud()
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    other = base / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    lines = []
    for node in nodes.values():
        for i, h in enumerate(node.workers):
            key = other.with_suffix(".pub") if i in node.wrong_keys else hosts.host_pub_key(h)
            lines.append(f"tpu.{node.id}-{i} {pub_key(key)}")
    (home / ".ssh" / "google_compute_known_hosts").write_text("\n".join(lines) + "\n")
    user = hosts.env["EF_NS_USER"]
    # gcloud looks for `USER:KEYTYPE KEY USER` in the node's ssh-keys (else it PATCHes it in)
    keys = f"{user}:{pub_key(Path(hosts.key + '.pub'))} {user}"
    fakes = {
        name: FakeNode(n.id, tuple(hosts.address(h) for h in n.workers), keys, state=n.state)
        for name, n in nodes.items()
    }
    try:
        api = FakeTpuApi(TPU_PROJECT, TPU_ZONE, fakes)
    except OSError as exc:
        pytest.fail(f"the fake TPU API could not start on loopback: {exc}")
    with api, pytest.MonkeyPatch.context() as mp:
        for k, v in gcloud_env(api, base).items() if patch_env else ():
            mp.setenv(k, v)
        yield api


def gcloud_env(api: FakeTpuApi, base: Path) -> dict[str, str]:
    """The environment that points gcloud at ``api`` (``fake_tpu(hosts, base, ...)``)."""
    return {**api.env(base / "cloudsdk"), "HOME": str(base / "home")}


def tpu_overrides(hosts: Hosts, name: str) -> list[str]:
    """The launch.py overrides of ``cluster=tpu_vm`` on the fake TPU ``name``: zone,
    project, the test user and key, the namespace sshds' port (an ssh flag), short
    timeouts."""
    return [
        "cluster=tpu_vm",
        f"cluster.tpu_vm.name={name}",
        f"cluster.tpu_vm.zone={TPU_ZONE}",
        f"cluster.tpu_vm.project={TPU_PROJECT}",
        f"cluster.tpu_vm.user={hosts.env['EF_NS_USER']}",
        f"cluster.tpu_vm.ssh_key_file={hosts.key}",
        f"cluster.tpu_vm.ssh_flags=['-p {hosts.port}']",
        "cluster.multihost.connect_timeout_s=5",
    ]
