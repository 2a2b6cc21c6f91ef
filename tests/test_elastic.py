"""Elastic training under torchrun: a job continues at whatever world size is there, and a crash loop
stops after launch.max_restarts with its root cause and every committed checkpoint kept."""

from __future__ import annotations

import os
import signal

import pytest

from harness.checkpoint.store import LocalStore
from harness.preemption import PREEMPTED_EXIT_CODE
from tests import runs
from tests.preemption.test_preemption import CONFIG


@pytest.mark.parametrize("incarnations,world_sizes", [
    ([(2, "ddp", 10), (1, "ddp", 30), (2, "ddp", None)], [2, 1]),
    ([(2, "fsdp", 10), (1, "fsdp", 25), (2, "fsdp", 40), (3, "fsdp", None)], [2, 1, 3]),  # resharded at each load
    ([(2, "ddp", 10), (2, "fsdp", 30), (2, "ddp", None)], [2]),  # a DDP checkpoint into FSDP and back
], ids=["ddp-2-1-2", "fsdp-2-1-2-3", "ddp-fsdp-ddp"])
def test_world_size_and_strategy_changes_consume_every_sample_exactly_once(tmp_path, incarnations, world_sizes):
    """Each incarnation is stopped (SIGTERM: saved, exit 75) after its step and the next one resumes
    at its own world size and strategy; the last trains to the end."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}", "train.audit_samples=true"]
    *stopped, (last_nproc, last_parallelism, _) = incarnations
    for nproc, parallelism, stop_after in stopped:
        proc = runs.start_launcher(nproc, [*overrides, f"train.parallelism={parallelism}"], log)
        try:
            runs.wait_for(lambda s=stop_after: runs.logged_step(log, s), what=f"step {stop_after}")
            os.kill(runs.training_workers(proc.pid)[0], signal.SIGTERM)
            assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
        finally:
            runs.kill_tree(proc.pid)
    assert runs.run_launcher(last_nproc, [*overrides, f"train.parallelism={last_parallelism}"], log) == 0, \
        runs.tail(log)
    summary = runs.summary(run_dir)
    assert summary["world_sizes"] == world_sizes and summary["final_step"] == 60
    # 16 samples a step, 15 at world size 3 (the largest multiple of 3): every index once, none skipped
    assert runs.consumed_samples(run_dir) == list(range(summary["sample_index"])), "a sample was repeated or skipped"


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
