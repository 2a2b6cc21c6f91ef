"""A local GCE metadata server: answers only with the `Metadata-Flavor: Google` header, supports
`wait_for_change=true` long-polls, and can be flipped (preempted), made to fail (503) or hang."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeMetadata:
    def __init__(self, attributes: dict[str, str] | None = None):
        self.values = {"instance/preempted": "FALSE", "instance/maintenance-event": "NONE"}
        for key, value in (attributes or {}).items():
            self.values[f"instance/attributes/{key}"] = value
        self.mode = "ok"  # ok | error (503) | hang
        self.requests: list[str] = []
        self._changed = threading.Condition()
        self._version = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                if self.headers.get("Metadata-Flavor") != "Google":
                    self.send_error(403, "Missing Metadata-Flavor: Google")
                    return
                if server.mode == "error":
                    self.send_error(503)
                    return
                if server.mode == "hang":
                    time.sleep(30)
                    return
                url = urlparse(self.path)
                key = url.path.removeprefix("/computeMetadata/v1/")
                if key not in server.values:
                    self.send_error(404)
                    return
                query = parse_qs(url.query)
                if query.get("wait_for_change") == ["true"]:
                    seen = query.get("last_etag", [str(server._version)])[0]
                    with server._changed:
                        server._changed.wait_for(lambda: str(server._version) != seen, timeout=2.0)
                body = server.values[key].encode()
                self.send_response(200)
                self.send_header("ETag", str(server._version))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the watcher gave up on a long-poll (process exited)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set(self, key: str, value: str) -> None:
        with self._changed:
            self.values[key] = value
            self._version += 1
            self._changed.notify_all()

    def preempt(self) -> None:
        self.set("instance/preempted", "TRUE")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
