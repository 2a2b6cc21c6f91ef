"""`GET /healthz` for MIG autohealing: 200 while training progresses or is in a known phase, 503 when
no step has completed for `stall_s`.

Served by the longest-living process of the node: the launcher (`python -m harness.launch`, what the
VM's unit runs), which exists before torchrun's rendezvous and between rounds, so a VM waiting for
its peers answers 200 `rendezvous` instead of being recreated by autohealing. The trainer's local
rank 0 reports its phase and progress to the launcher through a small JSON file (`SPOT_HEALTH_FILE`,
written on each phase change and at most every `REPORT_S` seconds on the step path). A trainer run
without the launcher (plain torchrun) serves the endpoint itself."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

log = logging.getLogger("harness.preemption")

BUSY_PHASES = ("starting", "rendezvous", "restoring", "saving", "preempted", "finished")
HEALTH_FILE_ENV = "SPOT_HEALTH_FILE"
REPORT_S = 5.0


class Status(Protocol):
    def status(self) -> tuple[int, dict]: ...


def _answer(phase: str, last_step: int, since: float, stall_s: float) -> tuple[int, dict]:
    healthy = phase in BUSY_PHASES or since < stall_s
    return (200 if healthy else 503), {"phase": phase, "last_step": last_step,
                                       "seconds_since_progress": round(since, 1)}


class Health:
    """The trainer's own view; `report_to` sends it to the launcher instead of serving it."""

    def __init__(self, stall_s: float, report_to: Path | None = None):
        self.stall_s = stall_s
        self.report_to = report_to
        self.phase = "starting"
        self.last_step = -1
        self.last_progress = time.monotonic()
        self._reported = 0.0
        self._report()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.last_progress = time.monotonic()
        self._report()

    def step_done(self, step: int) -> None:
        self.last_step = step
        self.last_progress = time.monotonic()
        if self.report_to and self.last_progress - self._reported >= min(REPORT_S, self.stall_s / 3):
            self._report()

    def status(self) -> tuple[int, dict]:
        return _answer(self.phase, self.last_step, time.monotonic() - self.last_progress, self.stall_s)

    def _report(self) -> None:
        """Atomically replace the report file: the launcher never reads half of one."""
        if not self.report_to:
            return
        self._reported = time.monotonic()
        since = self._reported - self.last_progress
        tmp = self.report_to.with_name(f".{self.report_to.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"phase": self.phase, "last_step": self.last_step,
                                       "last_progress": time.time() - since}))
            os.replace(tmp, self.report_to)
        except OSError as err:  # health must never stop training
            log.warning("cannot report health to %s: %s", self.report_to, err)


class LauncherHealth:
    """The node's endpoint as the launcher serves it: `rendezvous` while no trainer of the current
    round has reported (torchrun waiting for peers, between rounds), else the trainer's report, with
    its progress aged by the launcher's clock so a frozen trainer turns 503 too."""

    def __init__(self, stall_s: float, report_file: Path):
        self.stall_s = stall_s
        self.report_file = report_file
        self.round_started = time.time()

    def new_round(self) -> None:
        self.round_started = time.time()
        self.report_file.unlink(missing_ok=True)

    def status(self) -> tuple[int, dict]:
        try:
            report = json.loads(self.report_file.read_text())
        except (OSError, ValueError):
            report = None
        if not report or report.get("last_progress", 0) < self.round_started - 1:
            return _answer("rendezvous", -1, time.time() - self.round_started, self.stall_s)
        return _answer(report["phase"], report["last_step"], time.time() - report["last_progress"], self.stall_s)


def serve(health: Status, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
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
