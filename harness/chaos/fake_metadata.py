"""A fake GCE metadata server on a loopback port: one per simulated VM.

It answers `computeMetadata/v1/...` as GCE does where the startup scripts and the trainer look:
instance attributes (what startup.sh reads), `instance/preempted` and `instance/maintenance-event`
(what shutdown.sh and the trainer's watcher read), with `?wait_for_change=true` long-polls keyed by
ETag. A request without `Metadata-Flavor: Google` gets 403, an unknown key 404. For tests it can also
fail (`mode = "error"`: 503) or hang (`mode = "hang"`).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/computeMetadata/v1/"
ATTRIBUTES = "instance/attributes/"
LONG_POLL_S = 2.0  # GCE holds a wait_for_change request open until a change or its timeout


class FakeMetadata:
    """`attributes` holds the instance attributes; `values` the other keys (`instance/preempted`, ...)."""

    def __init__(self, attributes: dict[str, str] | None = None):
        self.attributes: dict[str, str] = dict(attributes or {})
        self.values: dict[str, str] = {"instance/preempted": "FALSE", "instance/maintenance-event": "NONE"}
        self.mode = "ok"  # ok | error (503) | hang
        self.requests: list[str] = []
        self._changed = threading.Condition()
        self._version = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                fake.requests.append(self.path)
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._answer(403, "Missing Metadata-Flavor:Google header.")
                    return
                if fake.mode == "error":
                    self._answer(503, "unavailable")
                    return
                if fake.mode == "hang":
                    time.sleep(30)
                    return
                url = urlparse(self.path)
                key = url.path.removeprefix(PREFIX) if url.path.startswith(PREFIX) else ""
                query = parse_qs(url.query)
                if query.get("wait_for_change") == ["true"]:
                    seen = query.get("last_etag", [str(fake._version)])[0]
                    with fake._changed:
                        fake._changed.wait_for(lambda: str(fake._version) != seen, timeout=LONG_POLL_S)
                value = fake.get(key)
                if value is None:
                    self._answer(404, "not found")
                else:
                    self._answer(200, value)

            def _answer(self, code: int, body: str) -> None:
                data = body.encode()
                try:
                    self.send_response(code)
                    self.send_header("Metadata-Flavor", "Google")
                    self.send_header("Content-Type", "application/text")
                    self.send_header("ETag", str(fake._version))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its process died)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def get(self, key: str) -> str | None:
        if key.startswith(ATTRIBUTES):
            return self.attributes.get(key.removeprefix(ATTRIBUTES))
        return self.values.get(key)

    def set(self, key: str, value: str) -> None:
        """Change a key and wake the long-polls waiting on it."""
        with self._changed:
            if key.startswith(ATTRIBUTES):
                self.attributes[key.removeprefix(ATTRIBUTES)] = value
            else:
                self.values[key] = value
            self._version += 1
            self._changed.notify_all()

    @property
    def preempted(self) -> str:
        return self.values["instance/preempted"]

    @preempted.setter
    def preempted(self, value: str) -> None:
        self.set("instance/preempted", value)

    def preempt(self) -> None:
        self.preempted = "TRUE"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
