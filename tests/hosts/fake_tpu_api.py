"""A fake of Google's Cloud TPU API for the real ``gcloud`` CLI, served on loopback.

Google's TPU API cannot exist here, so this stands in for it (and for the one Compute
Engine call gcloud makes on the way): ``gcloud compute tpus tpu-vm describe|ssh`` pointed
at it with ``CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU``/``..._COMPUTE`` (``FakeTpuApi.env``)
reads the nodes it holds, then runs the real ``ssh`` to their ``networkEndpoints``. What
gcloud asks, in order (found by logging every request; ``requests`` keeps them):

- ``GET  /v2/projects/P/locations/Z/nodes/N``: the node (``state: READY``, its workers'
  addresses in ``networkEndpoints``, ``metadata.ssh-keys`` holding the test user's key as
  gcloud formats it, ``USER:KEYTYPE KEY USER``, so it does not try to add it, and
  ``enable-oslogin: FALSE``). ``describe`` stops here.
- ``POST /v2/projects/P/locations/Z/nodes/N:getGuestAttributes``: 404 (gcloud then takes
  host keys from its known_hosts only, under the alias ``tpu.NODE_ID-WORKER``).
- ``GET  /compute/v1/projects/P``: the project, with no metadata (no OS Login, no
  project-wide keys).

Anything else (e.g. a ``PATCH`` of the node's metadata, which gcloud sends when the key
is missing) answers 404 and is recorded, so a test can assert it never came.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NODE = re.compile(
    r"^/v2(?:alpha1)?/projects/([^/]+)/locations/([^/]+)/nodes/([^/:?]+)(:[A-Za-z]+)?$"
)
PROJECT = re.compile(r"^/compute/v1/projects/([^/?]+)$")


@dataclass(frozen=True)
class FakeNode:
    """One TPU VM: its numeric id (gcloud's host-key alias is ``tpu.ID-WORKER``), the
    addresses of its workers, and the ``ssh-keys`` metadata line."""

    id: str
    endpoints: tuple[str, ...]
    ssh_keys: str
    state: str = "READY"
    accelerator: str = "v4-16"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    body: str


class FakeTpuApi:
    """``with FakeTpuApi(project, zone, {name: FakeNode}) as api:`` serves on
    ``127.0.0.1:api.port`` in a thread until the block ends."""

    def __init__(self, project: str, zone: str, nodes: dict[str, FakeNode]) -> None:
        self.project = project
        self.zone = zone
        self.nodes = dict(nodes)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeTpuApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def env(self, config_dir: Path) -> dict[str, str]:
        """The environment that points gcloud here: the endpoints, no credentials, no
        prompts, a throwaway configuration directory."""
        base = f"http://127.0.0.1:{self.port}/"
        return {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU": base,
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{base}compute/v1/",
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_CORE_PROJECT": self.project,
            "CLOUDSDK_COMPUTE_ZONE": self.zone,
        }

    def seen(self, method: str | None = None, pattern: str = "") -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and re.search(pattern, r.path)
            ]

    def _answer(self, method: str, path: str) -> tuple[int, dict]:
        m = NODE.match(path)
        if m and (m.group(1), m.group(2)) == (self.project, self.zone):
            name, verb = m.group(3), m.group(4)
            node = self.nodes.get(name)
            if node is None:
                return 404, _error(404, f"node {name} not found", "NOT_FOUND")
            if method == "GET" and verb is None:
                return 200, self._node_json(name, node)
            if method == "POST" and verb == ":getGuestAttributes":
                return 404, _error(404, "guest attributes are not served here", "NOT_FOUND")
        m = PROJECT.match(path)
        if m and method == "GET" and m.group(1) == self.project:
            return 200, {
                "kind": "compute#project",
                "name": self.project,
                "id": "1000",
                "commonInstanceMetadata": {"kind": "compute#metadata", "items": []},
            }
        return 404, _error(404, f"{method} {path} is not served by the fake TPU API", "NOT_FOUND")

    def _node_json(self, name: str, node: FakeNode) -> dict:
        return {
            "name": f"projects/{self.project}/locations/{self.zone}/nodes/{name}",
            "id": node.id,
            "state": node.state,
            "health": "HEALTHY",
            "apiVersion": "V2",
            "acceleratorType": node.accelerator,
            "runtimeVersion": "tpu-ubuntu2204-base",
            "networkEndpoints": [{"ipAddress": ip, "port": 8470} for ip in node.endpoints],
            "metadata": {"ssh-keys": node.ssh_keys, "enable-oslogin": "FALSE"},
        }

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size).decode(errors="replace") if size else ""
                path = self.path.split("?", 1)[0]
                with api._lock:
                    api.requests.append(Request(self.command, path, body))
                code, payload = api._answer(self.command, path)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, *args) -> None:  # requests are kept in api.requests
                pass

        return Handler


def _error(code: int, message: str, status: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}
