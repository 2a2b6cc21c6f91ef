"""A SIGTERM to one worker of a 2-process torchrun job and a relaunch, end to end: all ranks save the
same step and resume exactly (tests/test_preemption.preempt_and_resume), the goodput ledger outlives the
processes, one W&B run id spans both incarnations, Cloud Monitoring receives the shared metric names."""

from __future__ import annotations

import signal
import time

from harness.telemetry import metric_names
from harness.telemetry.goodput import breakdown
from harness.telemetry.ledger import read_ledger
from harness.telemetry.wandb_reader import offline_runs
from tests import runs
from tests.telemetry.fake_monitoring import FakeMonitoring
from tests.test_preemption import preempt_and_resume, signal_worker

DOWNTIME_S = 2.0


def test_sigterm_to_one_worker_resumes_exactly_and_goodput_sees_it(tmp_path, reference_sha):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    with FakeMonitoring() as monitoring:
        telemetry = ["wandb.mode=offline", "telemetry.monitoring.enabled=true", "telemetry.monitoring.project=proj",
                     f"telemetry.monitoring.endpoint={monitoring.address}", "telemetry.monitoring.period_s=10"]
        marker, summary = preempt_and_resume(
            tmp_path, reference_sha, signal_worker(1, signal.SIGTERM), extra_overrides=telemetry,
            when=lambda: runs.logged_step(log, 20),
            before_resume=lambda: time.sleep(DOWNTIME_S),  # no process of the job alive
        )
        series = monitoring.series()
    assert marker["source"] in ("SIGTERM", "another rank") and marker["ok"]
    assert summary["restarts"] == 1

    events = read_ledger(str(run_dir / "checkpoints" / "ledger"))
    b = breakdown(events)
    assert (b.preemptions, b.restarts, b.last_step, b.lost_steps) == (1, 1, summary["final_step"], 0)
    assert b.seconds["restore"] > 0
    assert b.seconds["downtime"] >= DOWNTIME_S
    measured = sum(e["seconds"] for e in events if e["kind"] == "steps" and e["rank"] == 0)
    assert abs(b.seconds["productive"] - measured) <= 0.05 * measured

    incarnations = offline_runs(run_dir, summary["wandb_run_id"])
    assert len(incarnations) == 2, "each incarnation resumes the same W&B run"
    assert {r.run_id for r in offline_runs(run_dir)} == {summary["wandb_run_id"]}
    logged_steps = [row["train/step"] for r in incarnations for row in r.history if "train/loss" in row]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == summary["final_step"]
    final = incarnations[-1].summary
    assert final["job/preemptions"] == 1 and 0 < final["job/goodput"] < 1

    written = {ts.metric.type for ts in series}
    assert {metric_names.GOODPUT, metric_names.LAST_STEP, metric_names.PREEMPTIONS} <= written
    last_steps = [ts.points[0].value for ts in series if ts.metric.type == metric_names.LAST_STEP]
    assert max(v.int64_value or v.double_value for v in last_steps) == summary["final_step"]
