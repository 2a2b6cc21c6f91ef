"""Goodput telemetry across a real preemption of a 2-process torchrun job: the ledger outlives the
processes, one W&B run id spans both incarnations, Cloud Monitoring receives the shared metric names."""

from __future__ import annotations

import os
import signal
import time

from harness.preemption import PREEMPTED_EXIT_CODE
from harness.telemetry import metric_names
from harness.telemetry.goodput import breakdown
from harness.telemetry.ledger import read_ledger
from harness.telemetry.wandb_reader import offline_runs
from tests import runs
from tests.telemetry.fake_monitoring import FakeMonitoring

DOWNTIME_S = 2.0


def test_ledger_wandb_and_monitoring_across_a_preemption(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    with FakeMonitoring() as monitoring:
        overrides = ["train.max_steps=60", "checkpoint.interval_steps=20", f"run.dir={run_dir}",
                     "telemetry.monitoring.enabled=true", "telemetry.monitoring.project=proj",
                     f"telemetry.monitoring.endpoint={monitoring.address}", "telemetry.monitoring.period_s=10"]
        proc = runs.start_launcher(2, overrides, log)
        try:
            runs.wait_for(lambda: runs.logged_step(log, 20), what="step 20")
            os.kill(runs.training_workers(proc.pid)[1], signal.SIGTERM)
            assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
        finally:
            runs.kill_tree(proc.pid)
        time.sleep(DOWNTIME_S)  # no process of the job alive
        assert runs.run_launcher(2, overrides, log) == 0, runs.tail(log)
        series = monitoring.series()

    events = read_ledger(str(run_dir / "checkpoints" / "ledger"))
    b = breakdown(events)
    assert (b.preemptions, b.restarts, b.last_step, b.lost_steps) == (1, 1, 60, 0)
    assert b.seconds["restore"] > 0
    assert b.seconds["downtime"] >= DOWNTIME_S
    measured = sum(e["seconds"] for e in events if e["kind"] == "steps" and e["rank"] == 0)
    assert abs(b.seconds["productive"] - measured) <= 0.05 * measured

    summary = runs.summary(run_dir)
    incarnations = offline_runs(run_dir, summary["wandb_run_id"])
    assert len(incarnations) == 2, "each incarnation resumes the same W&B run"
    assert {r.run_id for r in offline_runs(run_dir)} == {summary["wandb_run_id"]}
    logged_steps = [row["train/step"] for r in incarnations for row in r.history if "train/loss" in row]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == 60
    final = incarnations[-1].summary
    assert final["job/preemptions"] == 1 and 0 < final["job/goodput"] < 1

    written = {ts.metric.type for ts in series}
    assert {metric_names.GOODPUT, metric_names.LAST_STEP, metric_names.PREEMPTIONS} <= written
    last_steps = [ts.points[0].value for ts in series if ts.metric.type == metric_names.LAST_STEP]
    assert max(v.int64_value or v.double_value for v in last_steps) == 60
