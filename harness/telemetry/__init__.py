"""Goodput and cost telemetry: ledger, goodput, W&B and Cloud Monitoring sinks."""

from harness.telemetry.telemetry import Telemetry

__all__ = ["Telemetry"]
