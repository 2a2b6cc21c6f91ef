"""Goodput and cost telemetry: ledger, goodput, W&B and Cloud Monitoring sinks."""
