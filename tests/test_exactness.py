"""The core promise: a run SIGKILLed at any moment and relaunched ends with the same weights as a run
never interrupted, under either strategy (train.parallelism). Real processes, real signals; nproc=0 is
one plain process, 2 is torchrun x2."""

from __future__ import annotations

import pytest

from tests import runs

CONFIG = ["train.max_steps=40", "checkpoint.interval_steps=10", "model.n_embd=192", "model.n_layer=3",
          "checkpoint.write_threads=1"]


@pytest.fixture
def reference(reference_sha):
    return lambda nproc, parallelism="ddp": reference_sha(nproc, [*CONFIG, f"train.parallelism={parallelism}"])


def kill_then_resume(tmp_path, nproc: int, kill_when, parallelism: str = "ddp") -> dict:
    run_dir = tmp_path / "run"
    store = run_dir / "checkpoints"
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "log.txt"
    overrides = [*CONFIG, f"train.parallelism={parallelism}", f"run.dir={run_dir}"]
    proc = runs.start(nproc, overrides, log)
    try:
        runs.wait_for(lambda: kill_when(store), timeout=180, what="the kill point")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    after_kill = {"committed": runs.committed(store), "in_progress": runs.in_progress(store)}
    assert runs.run(nproc, overrides, log) == 0, runs.tail(log)
    return {"summary": runs.summary(run_dir), **after_kill, "leftovers": runs.in_progress(store)}


# 3: a sum of three depends on its order (DDP's bucket layout)
@pytest.mark.parametrize("nproc,parallelism", [(0, "ddp"), (2, "ddp"), (3, "ddp"), (2, "fsdp")])
def test_kill_between_checkpoints_resumes_exactly(tmp_path, reference, nproc, parallelism):
    result = kill_then_resume(
        tmp_path, nproc, lambda store: runs.committed(store) and not runs.in_progress(store), parallelism
    )
    assert result["committed"], "no checkpoint was committed before the kill"
    assert result["summary"]["restarts"] == 1
    assert result["summary"]["final_step"] == 40
    assert result["summary"]["model_sha256"] == reference(nproc, parallelism)


@pytest.mark.parametrize("nproc,parallelism", [(0, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_kill_during_checkpoint_write_resumes_exactly(tmp_path, reference, nproc, parallelism):
    for attempt in range(5):  # the write window is short: retry until the kill lands inside it
        result = kill_then_resume(tmp_path / str(attempt), nproc, runs.in_progress, parallelism)
        if result["in_progress"]:
            break
    else:
        pytest.fail("could not land a kill inside a checkpoint write in 5 attempts")
    assert result["summary"]["model_sha256"] == reference(nproc, parallelism)
    assert result["leftovers"] == [], "uncommitted leftovers of the killed save were not cleaned"
