"""Preemption end to end with real torchrun jobs: every notice caught, all ranks save at one step,
the preempted exit code, exact resume, and elastic world sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness.checkpoint.store import LocalStore
from harness.preemption import PREEMPTED_EXIT_CODE
from harness.preemption.health import Health, serve
from harness.telemetry.ledger import read_ledger
from tests import runs
from tests.fake_metadata import FakeMetadata

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


def test_world_size_2_1_2_consumes_every_sample_exactly_once(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}", "train.audit_samples=true"]
    for nproc, stop_after in ((2, 10), (1, 30)):
        proc = runs.start_launcher(nproc, overrides, log)
        try:
            runs.wait_for(lambda s=stop_after: runs.logged_step(log, s), what=f"step {stop_after}")
            os.kill(runs.training_workers(proc.pid)[0], signal.SIGTERM)
            assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
        finally:
            runs.kill_tree(proc.pid)
    assert runs.run_launcher(2, overrides, log) == 0, runs.tail(log)
    summary = runs.summary(run_dir)
    assert summary["world_sizes"] == [2, 1] and summary["final_step"] == 60
    consumed = []
    for record in (run_dir / "samples").glob("*.txt"):
        for line in record.read_text().splitlines():
            _step, first, stop = map(int, line.split())
            consumed.extend(range(first, stop))
    assert sorted(consumed) == list(range(60 * 16)), "a sample was repeated or skipped"


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


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def test_health_endpoint_reports_progress_and_a_stall(tmp_path):
    port, stall = runs.free_port(), tmp_path / "stall"
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=400", f"run.dir={run_dir}", "model._target_=tests.user_model.StallingBigram",
                 "health.enabled=true", f"health.port={port}", "health.stall_s=1"]
    proc = subprocess.Popen(runs.train_cmd(0, []) + overrides, cwd=runs.REPO, env=runs.env(STALL_FILE=str(stall)),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code, body = runs.wait_for(lambda: (r := get_health(port))[1].get("phase") == "training" and r,
                                   interval=0.05, what="healthz in the training phase")
        assert code == 200
        stall.touch()
        code, body = runs.wait_for(lambda: (r := get_health(port))[0] == 503 and r, interval=0.1, what="a 503")
        assert body["phase"] == "training" and body["seconds_since_progress"] >= 1
        stall.unlink()
        runs.wait_for(lambda: get_health(port)[0] == 200, interval=0.05, what="recovery")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()


def test_health_phases_are_healthy_while_restoring_and_saving():
    """The phases the loop sets around restore and emergency saves answer 200 however long they take."""
    health = Health(stall_s=0.0)
    server = serve(health, 0, host="127.0.0.1")
    port = server.server_address[1]
    try:
        for phase in ("starting", "restoring", "saving"):
            health.set_phase(phase)
            time.sleep(0.01)
            assert get_health(port) == (200, {**get_health(port)[1], "phase": phase})
        health.set_phase("training")
        time.sleep(0.01)
        assert get_health(port)[0] == 503
    finally:
        server.shutdown()


def test_crash_loop_stops_after_max_restarts_and_keeps_every_checkpoint(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=40", "checkpoint.interval_steps=5", f"run.dir={run_dir}",
                 "data._target_=tests.user_data.PoisonedTokens", "launch.max_restarts=2"]
    code = runs.run_launcher(2, overrides, log, extra_env={"POISON_AT": str(12 * 16)})
    text = log.read_text()
    assert code not in (0, PREEMPTED_EXIT_CODE)
    assert "corrupt record at sample 192" in text and "launch.max_restarts=2" in text
    assert text.count("resumed from step 10") == 2 * 2, "expected two restarts of two ranks"
    store = LocalStore(str(run_dir / "checkpoints"))
    assert store.committed_steps() == [5, 10]
    for step in (5, 10):
        store.verify(step)


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
