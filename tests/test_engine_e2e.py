"""The engine's consistency through real torchrun jobs and real signals: one cadence for all ranks,
a restore past a corrupt checkpoint that finishes exact, failures on one rank that every rank sees
(no hang), notices at awkward moments, and world sizes that need an adjusted batch split."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness.chaos.fake_metadata import FakeMetadata
from harness.checkpoint.gcs_store import GCSStore
from harness.checkpoint.manifest import MANIFEST
from harness.checkpoint.store import LocalStore, step_dirname
from harness.preemption import PREEMPTED_EXIT_CODE
from tests import runs
from tests.gcs_emulator import running_fake_gcs
from tests.preemption.test_preemption import CONFIG

# ---------------------------------------------------------------- one cadence


def test_auto_interval_commits_only_whole_checkpoints_and_a_kill_resumes_exact(tmp_path, reference_sha):
    """A short prior MTBI makes Young/Daly move the interval away from its initial 50 steps; both ranks
    must save at rank 0's steps (before, rank 1 drifted and step 289 was committed with half its files)."""
    config = ["train.max_steps=120", "checkpoint.interval_steps=auto", "checkpoint.mtbi_s=2", "checkpoint.keep=50"]
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    store = run_dir / "checkpoints"
    overrides = [*config, f"run.dir={run_dir}"]
    proc = runs.start(2, overrides, log)
    try:
        runs.wait_for(lambda: len(runs.committed(store)) >= 3, timeout=180, what="three checkpoints")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    assert runs.run(2, overrides, log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, config)
    local = LocalStore(str(store))
    steps = local.committed_steps()
    assert any(s % 50 for s in steps[:-1]), f"the interval never changed: {steps}"
    for step in steps:
        manifest = local.verify(step)
        assert {f"__{r}_0.distcp" for r in range(2)} <= set(manifest.files), step
    assert "checkpoint interval 50 ->" in log.read_text()


# ---------------------------------------------------------------- quarantine end to end


def flip_data_file(step_dir):
    f = sorted(step_dir.glob("*.distcp"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def flip_metadata(step_dir):
    f = step_dir / ".metadata"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF
    f.write_bytes(bytes(data))


def truncate_manifest(step_dir):
    f = step_dir / MANIFEST
    f.write_bytes(f.read_bytes()[:40])


@pytest.mark.parametrize("corrupt", [flip_data_file, flip_metadata, truncate_manifest])
def test_a_corrupt_newest_checkpoint_is_quarantined_and_the_relaunch_finishes_exact(tmp_path, reference_sha,
                                                                                      corrupt):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}"]
    assert runs.run(2, overrides, log) == 0, runs.tail(log)
    store = run_dir / "checkpoints"
    corrupt(store / step_dirname(60))
    (run_dir / "summary.json").unlink()
    assert runs.run(2, overrides, log) == 0, runs.tail(log)  # resumes at 40, commits 60 again
    assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, CONFIG)
    local = LocalStore(str(store))
    assert 60 in local.committed_steps()
    local.verify(60)
    (held,) = local.quarantined()
    assert held.reason["step"] == 60 and held.reason["reason"]
    listing = subprocess.run([sys.executable, "-m", "harness.checkpoint", "list", str(store)],
                             capture_output=True, text=True, env=runs.env())
    assert "quarantined" in listing.stdout and held.where in listing.stdout.replace("\n", "")


def test_a_corrupt_newest_checkpoint_on_gcs_with_the_local_disk_gone(tmp_path, reference_sha):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("quarantine-e2e")
        run_dir, log = tmp_path / "run", tmp_path / "log.txt"
        overrides = [*CONFIG, f"run.dir={run_dir}", "checkpoint.store=gs://quarantine-e2e/job"]
        assert runs.run(2, overrides, log) == 0, runs.tail(log)
        bucket = gcs.client().bucket("quarantine-e2e")
        store = GCSStore("gs://quarantine-e2e/job")
        manifest = store.read_manifest(60)
        name = f"job/{step_dirname(60)}/{manifest.attempt}/.metadata"
        bucket.blob(name).upload_from_string(b"not what was written")
        shutil.rmtree(run_dir / "staging")
        (run_dir / "summary.json").unlink()
        assert runs.run(2, overrides, log) == 0, runs.tail(log)
        assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, CONFIG)
        assert store.committed_steps()[-1] == 60 and store.read_manifest(60).attempt != manifest.attempt
        assert not any((run_dir / "restore").glob("step_*")), "the downloaded scratch copy was kept"
        (held,) = store.quarantined()
        assert held.reason["step"] == 60 and ".metadata" in held.reason["reason"]


# ---------------------------------------------------------------- a failure on one rank


FAULT = """
import json, sys, time
from pathlib import Path
from harness import config, distributed
from harness.checkpoint import manager as engine
from harness.state import TrainState
from harness.train import build

fault, out = sys.argv[1], Path(sys.argv[2])
cfg = config.load(sys.argv[3:])
d = distributed.init("cpu")
_, model, optimizer = build(cfg, d)
state = TrainState(model, optimizer, d.rank)
ckpt = engine.CheckpointManager(config.checkpoint_config(cfg), d)
real = (ckpt.first.attempt_dir, engine.ChecksummingWriter.write_data, ckpt.first.commit)
def fail(*args, **kwargs):
    raise OSError("injected: disk full")
if fault == "before" and d.rank == 1:
    ckpt.first.attempt_dir = lambda step, attempt: Path("/proc/no-such-dir") / str(step)
if fault == "during" and d.rank == 1:
    engine.ChecksummingWriter.write_data = fail
if fault == "after" and d.rank == 0:  # the files are written everywhere; the leader's commit fails
    ckpt.first.commit = fail
if fault == "conflict" and d.rank == 0:
    ckpt.first.step_dir(1).mkdir(parents=True)  # another writer's step 1
    (ckpt.first.step_dir(1) / "manifest.json").write_text("{}")
t0 = time.monotonic()
state.progress.step = 1
ckpt.save(1, state)
ckpt._wait_inflight()
result = {"committed": ckpt.last_committed, "conflict": ckpt.conflict is not None, "seconds": time.monotonic() - t0}
ckpt.first.attempt_dir, engine.ChecksummingWriter.write_data, ckpt.first.commit = real
if fault != "conflict":  # every rank is still in step: the next save commits everywhere
    state.progress.step = 2
    ckpt.save(2, state)
    ckpt._wait_inflight()
    result["next"] = ckpt.last_committed
out.with_suffix(f".{d.rank}.json").write_text(json.dumps(result))
ckpt.close()  # as the trainer ends: the writer thread is done before the process groups go
distributed.shutdown(d)
"""


@pytest.mark.parametrize("fault", ["before", "during", "after", "conflict"])
def test_a_save_failing_on_one_rank_gives_every_rank_the_same_outcome_without_a_hang(tmp_path, fault):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    out = tmp_path / "out"
    proc = runs.torchrun_script(2, script, [fault, str(out), *runs.FAST, f"run.dir={tmp_path}/run"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(2)]
    assert all(o["seconds"] < 60 for o in outcomes), outcomes  # a gloo timeout would be 300 s
    assert outcomes[0]["committed"] == outcomes[1]["committed"] is None
    assert outcomes[0]["conflict"] == outcomes[1]["conflict"] == (fault == "conflict")
    if fault != "conflict":
        assert outcomes[0]["next"] == outcomes[1]["next"] == 2
    committed = [p for p in (tmp_path / "run" / "checkpoints").glob("step_*") if (p / MANIFEST).exists()]
    assert {p.name for p in committed} == ({step_dirname(2)} if fault != "conflict" else {step_dirname(1)})


def test_a_conflict_seen_by_the_leader_stops_every_rank_at_one_boundary(tmp_path):
    """Another writer commits step 40 while this job runs: the leader's commit conflicts, and both
    ranks stop promptly with the root cause instead of one waiting for the other until a timeout."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    store = run_dir / "checkpoints"
    proc = runs.start(2, [*CONFIG, f"run.dir={run_dir}"], log)
    try:
        runs.wait_for(lambda: runs.committed(store), timeout=120, what="the first checkpoint")
        (store / step_dirname(40)).mkdir()
        (store / step_dirname(40) / MANIFEST).write_text("{}")  # another writer's step 40
        started = time.monotonic()
        code = proc.wait(timeout=90)
    finally:
        runs.kill_tree(proc.pid)
    assert code != 0 and time.monotonic() - started < 90
    assert log.read_text().count("was already committed by another writer") >= 2, runs.tail(log)
    assert (store / step_dirname(40)).is_dir(), "the other writer's step must stay"


# ---------------------------------------------------------------- notices at awkward moments


def test_a_notice_during_rendezvous_exits_75_with_a_truthful_marker_and_the_next_launch_resumes(tmp_path,
                                                                                             reference_sha):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}"]
    first = runs.start_launcher(2, overrides, log)
    try:
        runs.wait_for(lambda: runs.logged_step(log, 25), what="training past a checkpoint")
        runs.kill_tree(first.pid)  # the VM dies without notice
        first.wait()
    finally:
        runs.kill_tree(first.pid)
    waiting = runs.start_launcher(2, [*overrides, "launch.standalone=false", "launch.nnodes=2",
                                      f"launch.rdzv_endpoint=127.0.0.1:{runs.free_port()}"], log)
    try:
        time.sleep(8)  # torchrun is waiting for a second node that never comes
        assert waiting.poll() is None, runs.tail(log)
        waiting.send_signal(15)
        assert waiting.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
    finally:
        runs.kill_tree(waiting.pid)
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["source"].startswith("launcher") and marker["ok"] is True
    assert runs.run_launcher(2, overrides, log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, CONFIG)


def test_a_notice_during_a_restore_from_a_slower_tier_exits_75_and_resumes(tmp_path, reference_sha):
    """The metadata server says preempted before the trainer has restored (from pd: the local SSD
    is blank). The state to keep is the restored step, already durable on pd: marker ok, tier pd."""
    pd = "checkpoint.slower_tiers=[{name:pd,url:'" + str(tmp_path / "pd") + "',keep:3}]"
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*CONFIG, f"run.dir={run_dir}", "checkpoint.ephemeral=true", pd]
    proc = runs.start_launcher(2, overrides, log)
    try:
        runs.wait_for(lambda: LocalStore(str(tmp_path / "pd")).committed_steps(), what="a copy on pd")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    shutil.rmtree(run_dir / "checkpoints")  # the local SSD of the recreated VM is blank
    fake = FakeMetadata()
    try:
        fake.preempt()
        notified = runs.start_launcher(2, overrides, log, extra_env={"GCE_METADATA_HOST": fake.host})
        assert notified.wait(timeout=120) == PREEMPTED_EXIT_CODE, runs.tail(log)
    finally:
        fake.close()
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["ok"] is True and marker["tier"] == "pd"
    assert marker["step"] in LocalStore(str(tmp_path / "pd")).committed_steps()
    assert runs.run_launcher(2, overrides, log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, CONFIG)


def test_a_notice_during_a_background_promotion_exits_75_durable_and_resumes(tmp_path, reference_sha):
    """Local SSD first (ephemeral), pd behind it: the notice lands while a periodic checkpoint is being
    copied to pd. The emergency save must still end durable on pd, and the relaunch exact."""
    config = [*CONFIG, "model.n_embd=192", "model.n_layer=3"]
    pd = tmp_path / "pd"
    tier = "checkpoint.slower_tiers=[{name:pd,url:'" + str(pd) + "',keep:3}]"
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*config, f"run.dir={run_dir}", "checkpoint.ephemeral=true", tier]
    proc = runs.start_launcher(2, overrides, log)
    try:
        runs.wait_for(lambda: runs.in_progress(pd), timeout=180, interval=0.001, what="a copy to pd in flight")
        os.kill(runs.training_workers(proc.pid)[0], signal.SIGTERM)
        assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(log)
    finally:
        runs.kill_tree(proc.pid)
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["ok"] is True and marker["tier"] == "pd", marker
    LocalStore(str(pd)).verify(marker["step"])
    shutil.rmtree(run_dir / "checkpoints")  # the recreated VM's local SSD is blank
    assert runs.run_launcher(2, overrides, log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["model_sha256"] == reference_sha(2, config)


# ---------------------------------------------------------------- elastic splits


def test_world_sizes_2_3_1_with_a_split_that_needs_adjusting_consume_every_sample_once(tmp_path):
    """global 10 over micro-batches of at most 2: at 2 ranks 5 per rank (old code: ConfigError), at 3
    ranks 9 of 10 (old code: micro-batch 3 > 2), at 1 rank 5 micro-batches of 2."""
    config = ["train.max_steps=45", "checkpoint.interval_steps=5", "train.global_batch_size=10",
              "train.micro_batch_size=2", "train.audit_samples=true"]
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*config, f"run.dir={run_dir}"]
    for nproc, stop_after in ((2, 10), (3, 25)):
        proc = runs.start(nproc, overrides, log)
        try:
            runs.wait_for(lambda s=stop_after: runs.logged_step(log, s), what=f"step {stop_after}")
            runs.kill_tree(proc.pid, 15)
            proc.wait(timeout=60)
        finally:
            runs.kill_tree(proc.pid)
    assert runs.run(1, overrides, log) == 0, runs.tail(log)
    summary = runs.summary(run_dir)
    assert summary["final_step"] == 45 and set(summary["world_sizes"]) == {1, 2, 3}
    assert runs.consumed_samples(run_dir) == list(range(summary["sample_index"])), "a sample was repeated or skipped"
