"""The `telemetry` config group, typed and checked here (harness/config.py leaves it free-form so this
layer owns its keys). Errors are ConfigError naming the full key, e.g. `telemetry.monitoring.period_s`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from harness.config import ConfigError, structured

T = TypeVar("T")
MIN_MONITORING_PERIOD_S = 10.0


@dataclass
class MonitoringConfig:
    enabled: bool = False
    project: str | None = None  # GCP project the metrics are written to; required when enabled
    period_s: float = 60.0  # one batched CreateTimeSeries per period
    timeout_s: float = 10.0  # deadline of one request (on the sink's thread, never the loop's)
    endpoint: str | None = None  # host:port of a plain-text gRPC endpoint (a local server); None = Google's API


@dataclass
class CostBasis:
    """What this job runs on, to price it; machine_type null means no cost figures (a local run)."""

    machine_type: str | None = None
    gpu_type: str | None = None
    gpus_per_node: int = 0
    spot_nodes: int = 1
    on_demand_nodes: int = 0


@dataclass
class TelemetryConfig:
    ledger_flush_s: float = 5.0  # background ledger writes: the most a SIGKILL loses of the ledger
    job_metrics_s: float = 30.0  # how often rank 0 recomputes goodput and cost from the ledger
    queue_size: int = 10_000  # W&B rows buffered while W&B is slow; more are dropped and counted
    close_timeout_s: float = 5.0  # ledger write, then all sinks together, at exit: keep inside the notice
    retry_initial_s: float = 5.0  # back-off after a sink failure, doubling up to retry_max_s
    retry_max_s: float = 300.0
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    cost_basis: CostBasis = field(default_factory=CostBasis)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


def telemetry_config(node: Any) -> TelemetryConfig:
    """The `telemetry` group, typed and validated."""
    cfg = structured(TelemetryConfig, node, "telemetry")
    for key in ("ledger_flush_s", "job_metrics_s", "close_timeout_s", "retry_initial_s", "retry_max_s",
                "queue_size"):
        _positive(f"telemetry.{key}", getattr(cfg, key))
    m = cfg.monitoring
    if m.period_s < MIN_MONITORING_PERIOD_S:
        raise ConfigError(f"telemetry.monitoring.period_s={m.period_s} must be >= {MIN_MONITORING_PERIOD_S:g}:"
                          " Cloud Monitoring takes one point per series every few seconds at most")
    _positive("telemetry.monitoring.timeout_s", m.timeout_s)
    if m.enabled and not m.project:
        raise ConfigError("telemetry.monitoring.project is required when telemetry.monitoring.enabled=true")
    return cfg
