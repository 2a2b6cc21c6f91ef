"""The one object the training loop talks to: ledger + W&B + Cloud Monitoring + cost.

Who writes what: global rank 0 writes the job-level events (steps, checkpoints, restores, notices)
and owns the sinks; the first local rank of every other node writes its own node-level events (its
start, its exit, what it saw); other ranks' calls are no-ops. Each writer has its own ledger file.

What a call costs the loop: `on_step` and `event` touch memory only (a lock, a dict, a non-blocking
queue put). Ledger writes, W&B and Monitoring calls, and the goodput recomputation run on background
threads; `start`, `flush` and `close` are the only calls that wait, for at most the configured timeouts.
W&B comes up after this incarnation's first step (its rows wait in the queue until then): importing
wandb and starting its service process take seconds of CPU that a restart would otherwise share.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.cadence import estimate_mtbi_s
from harness.config import ConfigError, TelemetryConfig, telemetry_config
from harness.cost import CostModel
from harness.telemetry import events as ev
from harness.telemetry.breakdown import CHECKPOINT, PRODUCTIVE, Breakdown, breakdown
from harness.telemetry.clock import process_start_time
from harness.telemetry.ledger import Ledger, new_incarnation_id, read_ledger
from harness.telemetry.monitoring_sink import MonitoringSink
from harness.telemetry.wandb_sink import WandbSink

log = logging.getLogger(__name__)


def launched_at() -> float | None:
    """When this process's round was started: by the launcher (SPOT_LAUNCHED_AT), else by the torchrun
    agent above it (the agent's own start). None for a process run alone, or one that torchrun restarted
    (`launch.max_restarts`: when the agent restarted it is not known)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    if value := os.environ.get(ev.LAUNCHED_ENV):
        try:
            return float(value)
        except ValueError:
            return None
    return process_start_time(os.getppid()) if "TORCHELASTIC_RUN_ID" in os.environ else None


def run_id_of(events: list[dict[str, Any]]) -> str | None:
    """The job's W&B run id, recorded in its first `job_start` event."""
    return next((e.get("wandb_run_id") for e in events if e["kind"] == ev.JOB_START), None)


class Telemetry:
    def __init__(self, cfg: TelemetryConfig, ledger: Ledger | None, *, rank: int, run_id: str | None = None,
                 prior: list[dict[str, Any]] | None = None, wandb: WandbSink | None = None,
                 monitoring: MonitoringSink | None = None, cost: CostModel | None = None,
                 mtbi_prior_s: float = 3600.0):
        self.cfg = cfg
        self.ledger = ledger
        self.rank = rank
        self.run_id = run_id  # the job's W&B run id (rank 0)
        self.prior = list(prior or [])
        self.wandb = wandb
        self.monitoring = monitoring
        self.cost = cost
        self.mtbi_prior_s = mtbi_prior_s
        self.last_step: int | None = None
        self._steps_here = 0  # steps completed by this incarnation, for steps/s
        self._rate_mark = (time.monotonic(), 0)
        self._latest: Breakdown | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if rank == 0 and (wandb is not None or monitoring is not None):
            self._thread = threading.Thread(target=self._publish_loop, name="telemetry-job", daemon=True)
            self._thread.start()

    @classmethod
    def start(cls, job_cfg: DictConfig, *, rank: int, local_rank: int, world_size: int, node: str,
              ledger_location: str, monitoring_client: Any = None) -> Telemetry:
        """Build from the composed job config, record this process's start and, on the job's very
        first rank-0 start, the job's start with a new W&B run id (later starts reuse it); both are
        written before this returns (a failed write is retried by the ledger's flush thread)."""
        cfg = telemetry_config(job_cfg.get("telemetry"))
        if rank != 0 and local_rank != 0:
            return cls(cfg, None, rank=rank)
        cost = _cost_model(cfg, job_cfg.get("cost")) if rank == 0 else None
        ledger = Ledger(ledger_location, new_incarnation_id(rank), rank, node, cfg.ledger_flush_s,
                        timeout_s=cfg.close_timeout_s)
        launched = launched_at()
        ledger.event(ev.PROCESS_START, t=process_start_time(), pid=os.getpid(), world_size=world_size,
                     **({} if launched is None else {"launched": launched}))
        if rank != 0:
            ledger.flush()  # durable before this process trains: a kill at any later moment is counted
            return cls(cfg, ledger, rank=rank)

        def on_error(sink: str, error: str, count: int) -> None:
            ledger.event(ev.TELEMETRY_ERROR, sink=sink, error=error, count=count)

        try:
            prior = read_ledger(ledger_location)
        except Exception as err:  # an unreadable ledger must not stop training; a new run id follows
            on_error("ledger-read", f"{type(err).__name__}: {err}", 1)
            prior = []
        run_id = run_id_of(prior)
        if run_id is None:
            run_id = secrets.token_hex(4)
            prices = {} if cost is None else {
                "hourly_usd": cost.hourly, "on_demand_hourly_usd": cost.on_demand_hourly,
                "price_source": cost.source, "price_as_of": cost.as_of}
            ledger.event(ev.JOB_START, wandb_run_id=run_id, run_name=job_cfg.run.name, **prices)
        # This incarnation's start (and the job's run id) must outlive it even if it dies before its next
        # flush: restarts, world sizes and goodput count it from here. Read `prior` first: it must not
        # hold this incarnation's own events.
        ledger.flush()

        wandb_sink = None
        if job_cfg.wandb.mode != "disabled":
            wandb_sink = WandbSink(job_cfg.wandb, run_id, OmegaConf.to_container(job_cfg, resolve=True),
                                   name=job_cfg.run.name, queue_size=cfg.queue_size, on_error=on_error,
                                   retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s,
                                   wait_for_start=True)
        monitoring = None
        if cfg.monitoring.enabled:
            monitoring = MonitoringSink(cfg.monitoring.project, cfg.monitoring.period_s, monitoring_client,
                                        labels={"job": job_cfg.run.name}, timeout_s=cfg.monitoring.timeout_s,
                                        on_error=on_error, retry_initial_s=cfg.retry_initial_s,
                                        retry_max_s=cfg.retry_max_s, endpoint=cfg.monitoring.endpoint)
        return cls(cfg, ledger, rank=rank, run_id=run_id, prior=prior, wandb=wandb_sink, monitoring=monitoring,
                   cost=cost, mtbi_prior_s=float(job_cfg.checkpoint.mtbi_s))

    def event(self, kind: str, **fields: Any) -> None:
        """A ledger event from this process (no-op on ranks that do not write)."""
        if self.ledger is not None:
            self.ledger.event(kind, **fields)

    def on_step(self, step: int, step_time_s: float, metrics: Mapping[str, float] | None = None) -> None:
        """Step `step` completed in `step_time_s` (call it for every step: the ledger batches them);
        `metrics` (loss, lr, tokens_per_s, world_size, ...), when given, go to W&B as train/<name>.
        Rank 0 only; memory-only work."""
        if self.rank != 0 or self.ledger is None:
            return
        if self._steps_here == 0:  # the end of this incarnation's startup (its breakdown's last phase)
            self.ledger.event(ev.FIRST_STEP, step=step, seconds=step_time_s)
            if self.wandb is not None:
                self.wandb.start()
        self.ledger.steps_done(step, step, step_time_s)
        self.last_step = step
        self._steps_here += 1
        if self.wandb is not None and metrics is not None:
            self.wandb.log_step(step, {**metrics, "step_time_s": step_time_s})

    def breakdown(self) -> Breakdown:
        """Goodput so far: earlier incarnations' ledger plus this one's events, up to now."""
        own = self.ledger.events() if self.ledger is not None else []
        now = {"t": time.time(), "kind": ev.HEARTBEAT, "rank": self.rank,
               "incarnation": self.ledger.incarnation if self.ledger is not None else "?"}
        self._latest = breakdown(self.prior + own + [now])
        return self._latest

    def job_metrics(self) -> dict[str, float]:
        """Goodput, badput by category, preemptions, restarts and cost so far, for the sinks."""
        b = self.breakdown()
        out = b.metrics()
        out["checkpoint_blocking_s"] = b.seconds[CHECKPOINT]
        if self.cost is not None:
            out.update(self.cost.metrics(b.running_s, b.seconds[PRODUCTIVE], b.productive_steps))
        return out

    def mtbi_s(self) -> float:
        """Mean time between interruptions for `checkpoint.interval_steps=auto`: observed restarts,
        with the configured `checkpoint.mtbi_s` counted as one prior interruption."""
        b = self._latest or self.breakdown()
        return estimate_mtbi_s(b.running_s, b.restarts, self.mtbi_prior_s)

    def flush(self) -> bool:
        """Write the ledger now (at checkpoint and exit time); False when the store refused it."""
        return self.ledger.flush() if self.ledger is not None else True

    def close(self, exit_code: int) -> None:
        """Record the exit and make the ledger durable first (the record that matters), then publish
        the final job metrics and stop the sinks, all within `close_timeout_s` more."""
        self.event(ev.EXIT, code=exit_code)
        self.flush()
        deadline = time.monotonic() + self.cfg.close_timeout_s
        left = lambda: max(0.1, deadline - time.monotonic())
        self._stop.set()
        if self._thread is not None:
            self._thread.join(left())
            self._publish()
        if self.wandb is not None:
            self.wandb.close(exit_code, left())
        if self.monitoring is not None:
            self.monitoring.close(left())
        if self.ledger is not None:
            self.ledger.close()  # the sinks' last errors, if any

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.cfg.job_metrics_s):
            self._publish()

    def _publish(self) -> None:
        try:
            m = self.job_metrics()
        except Exception:  # a malformed ledger must not stop training; it shows in the log
            log.exception("goodput recomputation failed")
            return
        now, steps = time.monotonic(), self._steps_here
        mark_t, mark_steps = self._rate_mark
        self._rate_mark = (now, steps)
        rate = (steps - mark_steps) / (now - mark_t) if now > mark_t else 0.0
        m["steps_per_second"] = rate
        if self.wandb is not None:
            self.wandb.log_job(self.last_step or 0, m)
        if self.monitoring is not None:
            values = {"goodput": m["goodput"], "preemptions": m["preemptions"], "steps_per_second": rate,
                      "checkpoint_blocking_seconds": m["checkpoint_blocking_s"]}
            if self.last_step is not None:
                values["last_step"] = self.last_step
            self.monitoring.record(**values)


def _cost_model(cfg: TelemetryConfig, cost_cfg: Any) -> CostModel | None:
    b = cfg.cost_basis
    if not b.machine_type:
        return None
    prices = OmegaConf.to_container(cost_cfg, resolve=True) if isinstance(cost_cfg, DictConfig) else cost_cfg
    try:
        return CostModel.from_config(prices or {}, b.machine_type, b.gpu_type, b.gpus_per_node,
                                     b.spot_nodes, b.on_demand_nodes)
    except ConfigError as err:
        raise ConfigError(f"telemetry.cost_basis: {err}") from None
