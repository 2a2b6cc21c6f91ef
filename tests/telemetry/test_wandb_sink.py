"""W&B: one run per job across restarts (read back from the offline files), and a W&B that fails or
stalls never reaching the training loop."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.chaos.fake_monitoring import FakeMonitoring
from harness.telemetry import metric_names
from harness.telemetry.ledger import read_ledger
from harness.telemetry.wandb_reader import offline_runs
from harness.telemetry.wandb_sink import WandbSink

ROOT = Path(__file__).resolve().parents[2]


def incarnation(run_dir: Path, first: int, last: int, code: int, address: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.telemetry.incarnation", str(run_dir), str(first), str(last), str(code),
         address], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().removeprefix("run_id=")


def test_one_run_across_a_restart_with_goodput_metrics(tmp_path):
    with FakeMonitoring() as fake:
        first = incarnation(tmp_path, 1, 12, 75, fake.address)  # preempted after step 12
        second = incarnation(tmp_path, 11, 20, 0, fake.address)  # restored step 10, recomputes 11-12
        series = fake.series()
    assert first == second

    runs = offline_runs(tmp_path)
    assert [r.run_id for r in runs] == [first, first]  # two offline folders, one run id
    assert [r.exit_code for r in runs] == [75, 0]
    assert runs[0].step_metrics == {"train/*": "train/step", "job/*": "train/step"}
    assert runs[0].config["run"]["name"] == "exp" and runs[0].config["train"]["max_steps"] > 0
    steps = [[h["train/step"] for h in r.history if "train/loss" in h] for r in runs]
    assert steps == [list(range(1, 13)), list(range(11, 21))]
    row = next(h for h in runs[1].history if h.get("train/step") == 20 and "train/loss" in h)
    assert row["train/loss"] == pytest.approx(1 / 20)
    assert {"train/lr", "train/tokens_per_s", "train/world_size", "train/step_time_s"} <= set(row)

    final = runs[1].summary
    assert final["job/preemptions"] == 1 and final["job/restarts"] == 1
    assert final["job/lost_steps"] == 2 and final["job/productive_steps"] == 20
    assert 0 < final["job/goodput"] < 1
    assert final["job/seconds/downtime"] > 0
    assert final["job/checkpoint_blocking_s"] == pytest.approx(0.002 * 4 + 0.005, abs=0.01)
    assert runs[0].summary["job/restarts"] == 0

    events = read_ledger(str(tmp_path / "checkpoints" / "ledger"))
    assert [e["wandb_run_id"] for e in events if e["kind"] == "job_start"] == [first]
    assert [e["code"] for e in events if e["kind"] == "exit"] == [75, 0]

    last = {ts.metric.type: ts for ts in series}  # the final write of the second incarnation wins
    assert last[metric_names.LAST_STEP].points[0].value.int64_value == 20
    assert last[metric_names.PREEMPTIONS].points[0].value.int64_value == 1
    assert dict(last[metric_names.GOODPUT].metric.labels) == {"job": "exp"}


def test_failing_init_is_counted_retried_and_never_raised(tmp_path, monkeypatch):
    import wandb

    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    reported = []
    sink = WandbSink({"mode": "online", "project": "p", "dir": str(tmp_path)}, "abc", {},
                     retry_initial_s=0.05, retry_max_s=0.1,
                     on_error=lambda sink, error, count: reported.append(error))
    started = time.perf_counter()
    for step in range(2000):
        sink.log_step(step, {"loss": 1.0})
    per_call = (time.perf_counter() - started) / 2000
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sink.close(timeout_s=5)
    assert len(calls) >= 3 and calls[0]["id"] == "abc" and calls[0]["resume"] == "allow"
    assert sink.errors >= 3 and "unreachable" in reported[0]
    assert sink.dropped > 0
    assert per_call < 1e-3


def test_stalled_wandb_does_not_block_the_caller_and_close_is_bounded(tmp_path, monkeypatch):
    import wandb

    release = threading.Event()

    def stalled_init(**kwargs):
        release.wait(30)
        raise TimeoutError("wandb.init timed out")

    monkeypatch.setattr(wandb, "init", stalled_init)
    sink = WandbSink({"mode": "online", "project": "p", "dir": str(tmp_path)}, "abc", {}, queue_size=100)
    started = time.perf_counter()
    for step in range(1000):  # the queue fills up; extra rows are dropped, not waited for
        sink.log_step(step, {"loss": 1.0})
    assert time.perf_counter() - started < 0.5
    assert sink.dropped >= 900
    started = time.perf_counter()
    assert sink.close(timeout_s=0.5) is False
    assert time.perf_counter() - started < 1.5
    release.set()


def test_a_sink_made_to_wait_calls_wandb_only_once_started(tmp_path, monkeypatch):
    """The trainer's sink is started after its first step: until then wandb does nothing (its import and
    service process would slow the restart), and the rows logged meanwhile wait in the queue."""
    import wandb

    calls = []

    def unreachable(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", unreachable)
    sink = WandbSink({"mode": "online", "project": "p", "dir": str(tmp_path)}, "abc", {}, retry_initial_s=0.05,
                     wait_for_start=True)
    sink.log_step(1, {"loss": 1.0})
    time.sleep(0.3)
    assert calls == [] and sink.dropped == 0
    sink.start()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.close(timeout_s=5)
    assert calls and calls[0]["id"] == "abc"
