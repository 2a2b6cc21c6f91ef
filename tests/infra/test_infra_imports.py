"""infra's synthesis loads no part of the training runtime: reading the metric names, the job's config
schema and the job-end contract must not import torch, the telemetry sinks or the Google clients (the
harness's package faces are lazy)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import runs

PROBE = """
import json, sys
import infra.__main__, infra.stacks
print(json.dumps(sorted(sys.modules)))
"""
RUNTIME = ("torch", "wandb", "grpc", "google.cloud.storage", "google.cloud.monitoring_v3", "hydra.utils",
           "harness.telemetry.telemetry", "harness.telemetry.ledger", "harness.telemetry.monitoring_sink",
           "harness.telemetry.wandb_sink", "harness.checkpoint.manager", "harness.checkpoint.gcs_store",
           "harness.train", "harness.chaos")


def test_infra_synthesis_imports_no_runtime_module():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=runs.REPO, env=runs.env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert "harness.telemetry.metric_names" in loaded, "the probe reads what infra reads"
    assert not sorted(m for m in loaded if m in RUNTIME or m.startswith(tuple(f"{r}." for r in RUNTIME)))
