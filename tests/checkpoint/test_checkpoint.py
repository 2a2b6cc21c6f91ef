"""The checkpoint engine through its real code paths: DCP files on disk, manifests, CRC32C, retention,
promotion to slower tiers, verified restore, racing writers; GCS through fake-gcs-server."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from harness.checkpoint.manager import CheckpointManager, CheckpointMismatch, NoUsableCheckpoint
from harness.checkpoint.manifest import MANIFEST
from harness.checkpoint.store import LocalStore, step_dirname
from harness.config import CheckpointConfig
from harness.distributed import Dist
from harness.models.gpt import GPT
from harness.optim import build_optimizer
from harness.state import TrainState, model_sha256
from tests import runs
from tests.gcs_emulator import running_fake_gcs

TRAIN = ["train.max_steps=40", "checkpoint.interval_steps=10"]


def ckpt_cfg(tmp_path, **over):
    base = {"store": str(tmp_path / "local"), "keep": 3, "ephemeral": False, "slower_tiers": [],
            "staging_dir": str(tmp_path / "staging"), "scratch_dir": str(tmp_path / "scratch"),
            "write_threads": 2, "remote_retry_s": 10.0}
    base.update(over)
    # The engine's typed section, with the shipped defaults for the rest.
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CheckpointConfig), base))


def make_state(n_layer: int = 2, seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = GPT(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)
    optimizer = build_optimizer(model, OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9,
                                                         "beta2": 0.95}))
    return TrainState(model, optimizer, rank=0)


def advance(state: TrainState) -> None:
    """One real optimizer step, so every checkpoint holds different weights and optimizer state."""
    x = torch.randint(0, 64, (4, 16))
    state.model(x).logsumexp(-1).mean().backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.progress.step += 1
    state.progress.sample_index += 4


def save_steps(manager: CheckpointManager, state: TrainState, count: int) -> dict[int, str]:
    """Save `count` checkpoints, one per step; returns the model hash at each saved step."""
    hashes = {}
    for _ in range(count):
        advance(state)
        manager.save(state.progress.step, state)
        hashes[state.progress.step] = model_sha256(state.model)
    manager.close()
    return hashes


def newest_dir(tmp_path) -> str:
    return str(sorted((tmp_path / "local").glob("step_*"))[-1])


# ---------------------------------------------------------------- corruption


def truncate(d):
    f = sorted(p for p in d.iterdir() if p.suffix == ".distcp")[0]
    f.write_bytes(f.read_bytes()[:-100])
    return f.name, "size"


def flip(d):
    f = sorted(p for p in d.iterdir() if p.suffix == ".distcp")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f.name, "crc32c"


def delete_shard(d):
    f = sorted(p for p in d.iterdir() if p.suffix == ".distcp")[-1]
    f.unlink()
    return f.name, "missing"


def garble_manifest(d):
    (d / MANIFEST).write_text('{"step": 3, "files": ')
    return MANIFEST, "malformed manifest"


def drop_manifest(d):
    (d / MANIFEST).unlink()
    return MANIFEST, "manifest missing"


@pytest.mark.parametrize("corrupt", [truncate, flip, delete_shard, garble_manifest, drop_manifest])
def test_restore_skips_a_corrupt_checkpoint_and_says_why(tmp_path, caplog, corrupt):
    hashes = save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 3)
    name, reason = corrupt(tmp_path / "local" / step_dirname(3))
    state = make_state(seed=1)
    with caplog.at_level(logging.WARNING, logger="harness.checkpoint"):
        report = CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(state)
    assert report.step == 2 and state.progress.step == 2
    assert model_sha256(state.model) == hashes[2]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert name in warning and reason in warning


def test_no_verified_checkpoint_refuses_to_start_over_them(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path, keep=1), Dist()), make_state(), 2)
    flip(tmp_path / "local" / step_dirname(2))
    with pytest.raises(NoUsableCheckpoint, match="crc32c"):
        CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(make_state())
    assert (tmp_path / "local" / step_dirname(2)).is_dir(), "the corrupt checkpoint must be kept for a human"


def test_restore_refuses_a_checkpoint_of_another_model_naming_the_key(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(n_layer=2), 1)
    bigger = make_state(n_layer=3)
    before = model_sha256(bigger.model)
    with pytest.raises(CheckpointMismatch, match=r"model\.blocks\.2\.attn\.proj\.weight"):
        CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(bigger)
    assert model_sha256(bigger.model) == before, "a refused checkpoint must not be partially loaded"


# ---------------------------------------------------------------- retention and tiers


def test_each_tier_keeps_its_k_newest_and_slower_tiers_get_copies(tmp_path):
    slower = {"name": "pd", "url": str(tmp_path / "pd"), "keep": 3, "every": 2, "every_seconds": 0.0,
              "ephemeral": False}
    manager = CheckpointManager(ckpt_cfg(tmp_path, keep=2, slower_tiers=[slower]), Dist())
    save_steps(manager, make_state(), 8)
    assert LocalStore(str(tmp_path / "local")).committed_steps() == [7, 8]
    pd = LocalStore(str(tmp_path / "pd"))
    # every=2: every second checkpoint is copied; a newer one may supersede a pending copy
    assert len(pd.committed_steps()) == 3 and pd.committed_steps()[-1] == 8
    for step in pd.committed_steps():
        pd.verify(step)
    # The copy is byte-identical to what the first tier committed.
    assert (tmp_path / "pd" / step_dirname(8) / MANIFEST).read_text() == \
        (tmp_path / "local" / step_dirname(8) / MANIFEST).read_text()


def test_a_failed_delete_does_not_stop_retention_or_saving(tmp_path, monkeypatch):
    # Fault injection: as root no permission stops a delete, so one step's delete is made to fail.
    real_delete = LocalStore.delete

    def flaky_delete(self, step):
        if step == 1:
            raise OSError("device busy")
        real_delete(self, step)

    monkeypatch.setattr(LocalStore, "delete", flaky_delete)
    manager = CheckpointManager(ckpt_cfg(tmp_path, keep=2), Dist())
    save_steps(manager, make_state(), 5)
    assert LocalStore(str(tmp_path / "local")).committed_steps() == [1, 4, 5]
    assert manager.counters["failed"] >= 1


def test_restore_falls_back_to_a_slower_tier_when_the_local_ssd_is_gone(tmp_path):
    slower = {"name": "pd", "url": str(tmp_path / "pd"), "keep": 3, "every": 1, "every_seconds": 0.0,
              "ephemeral": False}
    cfg = ckpt_cfg(tmp_path, slower_tiers=[slower], ephemeral=True)
    hashes = save_steps(CheckpointManager(cfg, Dist()), make_state(), 3)
    shutil.rmtree(tmp_path / "local")  # the VM died with its local SSD
    state = make_state(seed=5)
    report = CheckpointManager(cfg, Dist()).restore(state)
    assert (report.step, report.tier) == (3, "pd")
    assert model_sha256(state.model) == hashes[3]


def test_emergency_save_on_an_ephemeral_tier_reaches_a_durable_one(tmp_path):
    slower = {"name": "pd", "url": str(tmp_path / "pd"), "keep": 3, "every": 100, "every_seconds": 0.0,
              "ephemeral": False}
    manager = CheckpointManager(ckpt_cfg(tmp_path, slower_tiers=[slower], ephemeral=True), Dist())
    state = make_state()
    advance(state)
    report = manager.save_now(state.progress.step, state, deadline_s=20)
    manager.close()
    assert report.ok and report.tier == "pd"
    LocalStore(str(tmp_path / "pd")).verify(1)


# ---------------------------------------------------------------- racing writers


def test_two_writers_on_one_store_exactly_one_commit_wins(tmp_path):
    """A stale VM that has not died yet and its replacement both save step 1 into one store."""
    stale, fresh = make_state(seed=1), make_state(seed=2)
    advance(stale)
    advance(fresh)
    managers = [CheckpointManager(ckpt_cfg(tmp_path), Dist()) for _ in range(2)]
    managers[0].save(1, fresh)
    managers[0].close()
    managers[1].save(1, stale)
    managers[1].close()
    assert managers[0].conflict is None
    assert managers[1].conflict is not None and "already committed" in str(managers[1].conflict)
    state = make_state(seed=3)
    CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(state)
    assert model_sha256(state.model) == model_sha256(fresh.model), "the winner's checkpoint was damaged"


def test_two_writers_racing_on_gcs(tmp_path, fake_gcs):
    fake_gcs.make_bucket("race")
    url = "gs://race/run"
    fresh, stale = make_state(seed=1), make_state(seed=2)
    advance(fresh)
    advance(stale)
    managers = []
    for state, where in ((fresh, "a"), (stale, "b")):  # two VMs: separate local SSDs, one bucket
        managers.append(CheckpointManager(ckpt_cfg(tmp_path / where, store=url), Dist()))
        managers[-1].save(1, state)
        managers[-1].close()
    assert managers[0].conflict is None
    assert managers[1].conflict is not None and "already committed" in str(managers[1].conflict)
    restored = make_state(seed=3)
    CheckpointManager(ckpt_cfg(tmp_path / "c", store=url), Dist()).restore(restored)
    assert model_sha256(restored.model) == model_sha256(fresh.model)


# ---------------------------------------------------------------- resharding


PROBE = """
import sys, torch
from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
from harness import config, distributed
from harness.config import CheckpointConfig
from harness.checkpoint.manager import CheckpointManager
from harness.state import TrainState
from harness.train import build
cfg = config.load(sys.argv[2:])
d = distributed.init("cpu")
_, model, optimizer = build(cfg, d)
state = TrainState(model, optimizer, d.rank)
CheckpointManager(config.checkpoint_config(cfg), d).restore(state)
model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
if d.rank == 0:
    torch.save({"model": model_sd, "optim": optim_sd["state"], "step": state.progress.step}, sys.argv[1])
distributed.shutdown(d)
"""


def test_checkpoint_saved_at_world_size_2_restores_at_1_and_3(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=10", "checkpoint.interval_steps=10", f"run.dir={run_dir}"]
    assert runs.run(2, overrides, log) == 0, runs.tail(log)
    saved_dir = run_dir / "checkpoints" / step_dirname(10)
    dcp_to_torch_save(saved_dir, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    (tmp_path / "probe.py").write_text(PROBE)
    for nproc in (1, 3):
        out = tmp_path / f"restored{nproc}.pt"
        proc = runs.torchrun_script(nproc, tmp_path / "probe.py", [str(out), *runs.FAST, *overrides])
        assert proc.returncode == 0, proc.stderr[-3000:]
        restored = torch.load(out, weights_only=False)
        assert restored["step"] == 10
        for key, tensor in restored["model"].items():
            assert torch.equal(tensor, saved["model"][key]), key
        for fqn, per_param in restored["optim"].items():
            for name, tensor in per_param.items():
                assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(saved["optim"]["state"][fqn][name]))


# ---------------------------------------------------------------- GCS end to end


def test_gcs_store_run_survives_a_kill_during_upload_and_the_loss_of_local_disk(tmp_path, reference_sha):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("train")
        store = LocalStore(str(tmp_path / "run" / "staging"))
        run_dir, log = tmp_path / "run", tmp_path / "log.txt"
        overrides = [*TRAIN, f"run.dir={run_dir}", "checkpoint.store=gs://train/job"]
        proc = runs.start(0, overrides, log)
        bucket = gcs.client().bucket("train")

        def uploading():
            manifests = {b.name.split("/")[1] for b in bucket.list_blobs(prefix="job/step_")
                         if b.name.endswith(MANIFEST)}
            staged = {step_dirname(s) for s in store.committed_steps()}
            return manifests and staged - manifests

        try:
            runs.wait_for(uploading, timeout=120, interval=0.001, what="a checkpoint upload in flight")
        finally:
            runs.kill_tree(proc.pid)
            proc.wait()
        shutil.rmtree(run_dir / "staging")  # the VM's local disk is gone with it
        assert runs.run(0, overrides, log) == 0, runs.tail(log)
        assert runs.summary(run_dir)["model_sha256"] == reference_sha(0, TRAIN)
        assert runs.summary(run_dir)["restarts"] == 1


def test_gcs_outage_during_training_does_not_stop_it(tmp_path):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("flaky")
        run_dir, log = tmp_path / "run", tmp_path / "log.txt"
        tier = "checkpoint.slower_tiers=[{name:gcs,url:'gs://flaky/job',keep:2}]"
        proc = runs.start(0, ["train.max_steps=60", "checkpoint.interval_steps=10", f"run.dir={run_dir}",
                              tier, "checkpoint.remote_retry_s=2"], log)
        runs.wait_for(lambda: runs.logged_step(log, 15), what="training to progress")
        gcs.stop()
        assert proc.wait(timeout=180) == 0, runs.tail(log)
    assert runs.summary(run_dir)["final_step"] == 60
    assert LocalStore(str(run_dir / "checkpoints")).committed_steps()[-1] == 60
    assert "copy of step" in log.read_text() and "failed" in log.read_text()


@pytest.mark.parametrize(
    ("store", "emulator", "expected"),
    [
        ("gs://no-such-bucket/x", "live", "gs://no-such-bucket/x"),
        ("gs://some-bucket/x", "closed", "gs://some-bucket/x"),
        ("gs://Bad_Bucket!/x", "live", "gs://Bad_Bucket!/x"),
        ("/proc/forbidden/checkpoints", "live", "/proc/forbidden/checkpoints"),
        ("ftp://host/x", "live", "ftp://host/x"),
    ],
)
def test_bad_store_fails_at_start_naming_it(tmp_path, fake_gcs, store, emulator, expected):
    host = fake_gcs.host if emulator == "live" else f"http://127.0.0.1:{runs.free_port()}"
    env = runs.env(STORAGE_EMULATOR_HOST=host)
    proc = subprocess.run([sys.executable, "-m", "harness.launch", f"run.dir={tmp_path}/run",
                           f"checkpoint.store={store}"], cwd=runs.REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("step_*"))


def test_cli_lists_and_verifies_naming_the_bad_checkpoint(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 3)
    flip(tmp_path / "local" / step_dirname(2))
    store = str(tmp_path / "local")
    cli = [sys.executable, "-m", "harness.checkpoint"]
    listing = subprocess.run([*cli, "list", store], capture_output=True, text=True, env=runs.env(COLUMNS="300"))
    assert listing.returncode == 1
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") >= 4}
    assert set(rows) == {"1", "2", "3"}
    assert "crc32c" in rows["2"] and "ok" in rows["3"] and "ok" in rows["1"]
    assert subprocess.run([*cli, "verify", store], capture_output=True, env=runs.env()).returncode == 0
    bad = subprocess.run([*cli, "verify", store, "2"], capture_output=True, text=True, env=runs.env(COLUMNS="300"))
    assert bad.returncode == 1 and "crc32c" in bad.stdout
