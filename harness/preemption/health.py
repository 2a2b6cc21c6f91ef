"""`GET /healthz` for MIG autohealing: 200 while training progresses or is in a known phase, 503 when
no step has completed for `stall_s`. Served by local rank 0 of each node from a daemon thread."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("harness.preemption")

BUSY_PHASES = ("starting", "rendezvous", "restoring", "saving", "preempted", "finished")


class Health:
    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self.phase = "starting"
        self.last_step = -1
        self.last_progress = time.monotonic()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.last_progress = time.monotonic()

    def step_done(self, step: int) -> None:
        self.last_step = step
        self.last_progress = time.monotonic()

    def status(self) -> tuple[int, dict]:
        since = time.monotonic() - self.last_progress
        healthy = self.phase in BUSY_PHASES or since < self.stall_s
        body = {"phase": self.phase, "last_step": self.last_step, "seconds_since_progress": round(since, 1)}
        return (200 if healthy else 503), body


def serve(health: Health, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Start the endpoint; a port already in use disables it with a warning rather than the job."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            code, body = health.status()
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        log.warning("health endpoint disabled: cannot listen on port %d (%s); set health.port", port, err)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="healthz").start()
    return server
