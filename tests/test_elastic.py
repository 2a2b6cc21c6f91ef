"""Elastic training under torchrun: a job continues at whatever world size is there, and a crash loop
stops after launch.max_restarts with its root cause and every committed checkpoint kept."""

from __future__ import annotations

import os
import signal

from harness.checkpoint.store import LocalStore
from harness.preemption import PREEMPTED_EXIT_CODE
from tests import runs
from tests.test_preemption import CONFIG


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
