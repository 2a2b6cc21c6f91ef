"""`GET /healthz` for MIG autohealing: 200 while the node's current phase is within its bound, 503 once
it outlives it: `training` without a completed step for `health.stall_s`, `rendezvous` (waiting for
peers, between rounds) for `health.rendezvous_s`, `starting`/`restoring` for `health.restore_s`,
`saving` for `health.save_s`; `preempted` and `finished` are never unhealthy (the VM is on its way
out). The body is `{"phase", "phase_s", "last_step", "seconds_since_progress", "bound_s"}`.

Served by the longest-living process of the node: the launcher (`python -m harness.launch`, what the
VM's unit runs), which exists before torchrun's rendezvous and between rounds, so a VM waiting for
its peers answers 200 `rendezvous` instead of being recreated by autohealing. The trainer's local
rank 0 reports its phase and progress to the launcher through a small JSON file (`SPOT_HEALTH_FILE`,
written on each phase change and at most every `REPORT_S` seconds on the step path). A trainer run
without the launcher (plain torchrun) serves the endpoint itself."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("harness.preemption")

UNBOUNDED_PHASES = ("preempted", "finished")
HEALTH_FILE_ENV = "SPOT_HEALTH_FILE"
REPORT_S = 5.0


@dataclass(frozen=True)
class Bounds:
    """How long each phase may last before the node answers 503 (config `health.*`)."""

    stall_s: float  # training: since the last completed step
    rendezvous_s: float
    restore_s: float  # starting and restoring
    save_s: float

    @classmethod
    def of(cls, cfg: Any) -> Bounds:
        return cls(float(cfg.stall_s), float(cfg.rendezvous_s), float(cfg.restore_s), float(cfg.save_s))

    def of_phase(self, phase: str) -> float:
        if phase in UNBOUNDED_PHASES:
            return math.inf
        return {"rendezvous": self.rendezvous_s, "starting": self.restore_s, "restoring": self.restore_s,
                "saving": self.save_s}.get(phase, self.stall_s)


class Status(Protocol):
    def status(self) -> tuple[int, dict]: ...


def _answer(phase: str, last_step: int, phase_s: float, since: float, bounds: Bounds) -> tuple[int, dict]:
    bound = bounds.of_phase(phase)
    return (200 if since < bound else 503), {
        "phase": phase, "phase_s": round(phase_s, 1), "last_step": last_step,
        "seconds_since_progress": round(since, 1), "bound_s": None if math.isinf(bound) else bound}


class Health:
    """The trainer's own view; `report_to` sends it to the launcher instead of serving it."""

    def __init__(self, bounds: Bounds, report_to: Path | None = None):
        self.bounds = bounds
        self.report_to = report_to
        self.phase = "starting"
        self.last_step = -1
        self.phase_started = self.last_progress = time.monotonic()
        self._reported = 0.0
        self._report()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_started = self.last_progress = time.monotonic()
        self._report()

    def step_done(self, step: int) -> None:
        self.last_step = step
        self.last_progress = time.monotonic()
        if self.report_to and self.last_progress - self._reported >= min(REPORT_S, self.bounds.stall_s / 3):
            self._report()

    def status(self) -> tuple[int, dict]:
        now = time.monotonic()
        return _answer(self.phase, self.last_step, now - self.phase_started, now - self.last_progress, self.bounds)

    def _report(self) -> None:
        """Atomically replace the report file: the launcher never reads half of one."""
        if not self.report_to:
            return
        self._reported = time.monotonic()
        wall = time.time() - self._reported  # the monotonic clock's zero on the wall clock
        tmp = self.report_to.with_name(f".{self.report_to.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"phase": self.phase, "last_step": self.last_step,
                                       "phase_started": wall + self.phase_started,
                                       "last_progress": wall + self.last_progress}))
            os.replace(tmp, self.report_to)
        except OSError as err:  # health must never stop training
            log.warning("cannot report health to %s: %s", self.report_to, err)


class LauncherHealth:
    """The node's endpoint as the launcher serves it: `rendezvous` while no trainer of the current
    round has reported (torchrun waiting for peers, between rounds), else the trainer's report, with
    its progress aged by the launcher's clock so a frozen trainer turns 503 too."""

    def __init__(self, bounds: Bounds, report_file: Path):
        self.bounds = bounds
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
        now = time.time()
        if not report or report.get("phase_started", 0) < self.round_started - 1:
            waited = now - self.round_started
            return _answer("rendezvous", -1, waited, waited, self.bounds)
        return _answer(report["phase"], report["last_step"], now - report["phase_started"],
                       now - report["last_progress"], self.bounds)


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
