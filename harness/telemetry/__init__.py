"""Goodput and cost telemetry: ledger, goodput breakdown, W&B and Cloud Monitoring sinks.

The package face is lazy: `harness.telemetry.metric_names` (what infra's alerts and dashboard read) or
`harness.telemetry.events` load nothing else; `Telemetry` loads the runtime (sinks, ledger, cost model,
the Google clients) on first use (PEP 562)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.telemetry.telemetry import Telemetry

__all__ = ["Telemetry"]


def __getattr__(name: str) -> Any:
    if name == "Telemetry":
        from harness.telemetry.telemetry import Telemetry

        return Telemetry
    raise AttributeError(f"module 'harness.telemetry' has no attribute {name!r}")
