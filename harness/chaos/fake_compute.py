"""A stand-in for the Compute Engine API's instance-group resize: the local Spot cloud's MIGs, and tests.

There is no Compute Engine emulator (fake-gcs-server covers only Cloud Storage), so this local HTTP
server takes the two calls the harness makes, `regionInstanceGroupManagers.resize` and
`instanceGroupManagers.resize` (`POST /compute/v1/<group path>/resize?size=N`), records them, sets
the group's target size in `sizes` and answers as the API does: 200 with an Operation. Point
SPOT_COMPUTE_ENDPOINT at `endpoint`. `fail` holds status codes to answer first, one per request
(retries, refusals).

    with FakeCompute() as compute:
        ... SPOT_COMPUTE_ENDPOINT=compute.endpoint ...
        assert compute.calls == [("projects/p/regions/r/instanceGroupManagers/n", 0)]
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/compute/v1/"
SUFFIX = "/resize"


class FakeCompute:
    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = dict(sizes or {})  # group path -> target size, as the resizes left it
        self.calls: list[tuple[str, int]] = []  # (group path, size), accepted or not
        self.authorized: list[bool] = []  # whether each request carried an Authorization header
        self.fail: list[int] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                if not (url.path.startswith(PREFIX) and url.path.endswith(SUFFIX)):
                    self._answer(404, {"error": {"code": 404, "message": f"no such method {url.path}"}})
                    return
                group = url.path[len(PREFIX) : -len(SUFFIX)]
                size = int(parse_qs(url.query)["size"][0])
                with fake._lock:
                    fake.calls.append((group, size))
                    fake.authorized.append("Authorization" in self.headers)
                    status = fake.fail.pop(0) if fake.fail else 200
                    if status == 200:
                        fake.sizes[group] = size
                if status != 200:
                    self._answer(status, {"error": {"code": status, "message": f"injected {status}"}})
                    return
                self._answer(200, {"kind": "compute#operation", "name": f"operation-{len(fake.calls)}",
                                   "operationType": "compute.instanceGroupManagers.resize",
                                   "targetLink": f"https://compute.googleapis.com/compute/v1/{group}",
                                   "status": "RUNNING"})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/compute/v1"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeCompute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
