"""The goodput ledger end to end with real torchrun jobs. A SIGTERM to one worker of a 2-process job and
a relaunch: all ranks save the same step and resume exactly (tests/preemption/test_preemption.preempt_and_resume),
the ledger outlives the processes, one W&B run id spans both incarnations, Cloud Monitoring receives the
shared metric names, and the resumed start's split (launcher to first step) is in the ledger, the summary
and the trainer's goodput table. Whole-tree SIGKILLs at world sizes 2 and 1: the ledger still has every incarnation
(restarts, world sizes) and what each did up to `telemetry.ledger_flush_s` before its death."""

from __future__ import annotations

import signal
import time

import pytest

from harness.chaos.fake_monitoring import FakeMonitoring
from harness.telemetry import metric_names
from harness.telemetry.breakdown import PHASES, PRODUCTIVE, breakdown
from harness.telemetry.ledger import read_ledger
from harness.telemetry.wandb_reader import offline_runs
from tests import runs
from tests.preemption.test_preemption import preempt_and_resume, signal_worker

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

    resumed = b.startups[-1]  # the relaunch's way back to training, from its launcher's start
    mine = {e["kind"]: e for e in events if e["incarnation"] == resumed.incarnation}
    assert resumed.restored_step == marker["step"] and list(resumed.phases) == list(PHASES)
    assert all(seconds >= 0 for seconds in resumed.phases.values())
    assert resumed.total_s == pytest.approx(mine["first_step"]["t"] - mine["process_start"]["launched"])
    assert summary["start_seconds/total"] == pytest.approx(resumed.total_s, abs=1e-5)
    shown = " ".join(log.read_text().replace("│", " ").split())  # the trainer's goodput table, at the end
    assert f"latest start (from step {marker['step']}) {resumed.total_s:.2f} s" in shown
    assert all(f" {phase.replace('_', ' ')} {s:.2f} s" in shown for phase, s in resumed.phases.items())

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


def test_sigkills_at_world_sizes_2_and_1_lose_no_incarnation_and_at_most_the_flush_interval(tmp_path):
    flush_s = 0.5
    run_dir = tmp_path / "run"
    store, ledger = run_dir / "checkpoints", str(run_dir / "checkpoints" / "ledger")
    overrides = ["train.max_steps=300", "checkpoint.interval_steps=20", f"telemetry.ledger_flush_s={flush_s}",
                 f"run.dir={run_dir}"]

    def killed(nproc: int, log, until) -> None:
        proc = runs.start(nproc, overrides, log)
        try:
            runs.wait_for(until, what=f"the kill point at world size {nproc}")
        finally:
            runs.kill_tree(proc.pid)  # the whole tree, as a VM dies: no notice, no final flush
            proc.wait()

    # 1: world size 2, killed well past its first checkpoint, 3 flush intervals after step 30 was logged.
    log1 = tmp_path / "1.txt"
    killed(2, log1, lambda: runs.logged_step(log1, 30) and (time.sleep(3 * flush_s) or True))
    checkpoints = runs.committed(store)
    assert checkpoints, "no checkpoint before the first kill"
    first = [e for e in read_ledger(ledger) if e["rank"] == 0]
    first_inc = first[0]["incarnation"]
    assert max(e["last"] for e in first if e["kind"] == "steps") >= 30, "the ledger lost more than its interval"
    resumed_at = int(checkpoints[-1].removeprefix("step_"))

    # 2: world size 1, killed before its own first checkpoint: only the ledger knows it ran.
    log2 = tmp_path / "2.txt"
    killed(1, log2, lambda: runs.logged_step(log2, resumed_at + 5))
    assert runs.committed(store) == checkpoints, "the world-size-1 incarnation committed a checkpoint"

    # 3: world size 2 to the end.
    log3 = tmp_path / "3.txt"
    assert runs.run(2, overrides, log3) == 0, runs.tail(log3)
    summary = runs.summary(run_dir)
    assert (summary["final_step"], summary["restarts"], summary["world_sizes"]) == (300, 2, [2, 1])

    b = breakdown(read_ledger(ledger))
    life = next(life for life in b.lives if life.incarnation == first_inc)
    kept = sum(e["seconds"] * max(0, min(e["last"], resumed_at) - e["first"] + 1) / (e["last"] - e["first"] + 1)
               for e in first if e["kind"] == "steps")
    in_breakdown = sum(s.end - s.start for s in b.segments
                       if s.category == PRODUCTIVE and life.start <= s.start < life.end)
    assert kept > 0 and in_breakdown == pytest.approx(kept, rel=0.05), "the first incarnation's productive time"
    assert summary["seconds/productive"] == pytest.approx(b.seconds[PRODUCTIVE], rel=0.05)
    assert summary["lost_steps"] >= max(e["last"] for e in first if e["kind"] == "steps") - resumed_at
