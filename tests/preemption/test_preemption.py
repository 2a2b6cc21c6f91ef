"""Preemption end to end with real torchrun jobs: every notice caught, all ranks save at one step,
the preempted exit code, exact resume, and elastic world sizes."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from harness.chaos.fake_metadata import FakeMetadata
from harness.preemption import PREEMPTED_EXIT_CODE
from harness.telemetry.ledger import read_ledger
from tests import runs

CONFIG = ["train.max_steps=60", "checkpoint.interval_steps=20"]


def emergency_steps(log) -> list[int]:
    """The step each rank reported for its emergency checkpoint."""
    lines = [line for line in log.read_text().splitlines() if "emergency checkpoint at step" in line]
    return [int(line.rsplit("step", 1)[1].split()[0]) for line in lines]


def preempt_and_resume(tmp_path, reference_sha, notify, nproc: int = 2, when=None, extra_env=None,
                       before_resume=lambda: None, extra_overrides=()):
    """Run, deliver a notice with notify(launcher), expect exit 75 and a marker, resume to the end."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}", *extra_overrides]
    proc = runs.start_launcher(nproc, overrides, log, extra_env=extra_env)
    try:
        runs.wait_for(when or (lambda: runs.logged_step(log, 10)), what="training to progress")
        notify(proc)
        assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
    finally:
        runs.kill_tree(proc.pid)
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    steps = emergency_steps(log)
    assert len(steps) == nproc and set(steps) == {marker["step"]}, f"ranks saved at {steps}"
    saved = run_dir / "checkpoints" / f"step_{marker['step']:09d}"
    assert {f"__{r}_0.distcp" for r in range(nproc)} <= {p.name for p in saved.iterdir()}
    before_resume()
    resumed = runs.start_launcher(nproc, overrides, log, extra_env=extra_env)
    assert resumed.wait(timeout=240) == 0, runs.tail(log)
    summary = runs.summary(run_dir)
    assert summary["model_sha256"] == reference_sha(2, CONFIG)
    assert not (run_dir / "PREEMPTED").exists(), "the marker of the previous incarnation was not cleared"
    return marker, summary


def signal_worker(index: int, *signals: int):
    def notify(proc):
        worker = runs.training_workers(proc.pid)[index]
        for sig in signals:
            os.kill(worker, sig)
            time.sleep(0.05)
    return notify


def test_metadata_preempted_without_signal(tmp_path, reference_sha):
    fake = FakeMetadata()
    try:
        marker, _ = preempt_and_resume(
            tmp_path, reference_sha, lambda _proc: fake.preempt(),
            extra_env={"GCE_METADATA_HOST": fake.host},
            before_resume=lambda: fake.set("instance/preempted", "FALSE"),  # as on a recreated VM
        )
    finally:
        fake.close()
    assert marker["source"].startswith("metadata:")


def test_sigterm_during_checkpoint_write_then_a_second_notice(tmp_path, reference_sha):
    store = tmp_path / "run" / "checkpoints"
    preempt_and_resume(
        tmp_path, reference_sha, signal_worker(0, signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1),
        when=lambda: runs.in_progress(store),
    )


def test_ctrl_c_on_the_launcher_saves_and_the_same_command_resumes(tmp_path, reference_sha):
    """As a terminal's Ctrl-C: SIGINT to the launcher's whole process group (launcher and torchrun)."""
    preempt_and_resume(tmp_path, reference_sha, lambda proc: os.killpg(proc.pid, signal.SIGINT))


@pytest.mark.parametrize("mode", ["closed", "error", "hang"])
def test_unreachable_metadata_server_does_not_disturb_training(tmp_path, mode):
    fake = FakeMetadata()
    host = fake.host
    if mode == "closed":
        fake.close()
    else:
        fake.mode = mode
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    try:
        code = runs.run(0, ["train.max_steps=30", f"run.dir={run_dir}"], log, extra_env={"GCE_METADATA_HOST": host})
    finally:
        if mode != "closed":
            fake.close()
    assert code == 0, runs.tail(log)
    assert runs.summary(run_dir)["final_step"] == 30
    if mode == "error":
        assert len(fake.requests) >= 2, "the watcher did not retry"


def test_sigkill_without_notice_resumes_from_the_last_periodic_checkpoint_and_reports_lost_steps(
        tmp_path, reference_sha):
    config = ["train.max_steps=100", "checkpoint.interval_steps=40", "telemetry.ledger_flush_s=0.2"]
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    ledger = str(run_dir / "checkpoints" / "ledger")

    def recorded_step() -> int:
        steps = [e["last"] for e in read_ledger(ledger) if e["kind"] == "steps"] if os.path.isdir(ledger) else []
        return max(steps, default=0)

    proc = runs.start(0, [*config, f"run.dir={run_dir}"], log)
    try:
        runs.wait_for(lambda: recorded_step() >= 55, interval=0.05, what="steps past the checkpoint at 40")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    lost = recorded_step() - 40
    assert runs.run(0, [*config, f"run.dir={run_dir}"], log) == 0, runs.tail(log)
    summary = runs.summary(run_dir)
    assert summary["lost_steps"] == lost > 0
    assert summary["model_sha256"] == reference_sha(0, config)
