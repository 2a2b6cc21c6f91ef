"""What the engine may trust, through its real code paths: quarantine instead of traps, retention that
keeps what a promotion copies, emergency copies within their deadline, listing failures that fail,
restores that never unpickle, and RNG/batch splits that stay exact at the edges."""

from __future__ import annotations

import pickle
import random
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from harness import config
from harness.batching import BatchPlan
from harness.cadence import Cadence
from harness.checkpoint.gcs_store import GCSStore
from harness.checkpoint.manager import CheckpointManager, TierUnavailable
from harness.checkpoint.manifest import MANIFEST, Manifest, file_entry
from harness.checkpoint.store import REASON, LocalStore, Transfer, TransferAbandoned, step_dirname
from harness.distributed import Dist
from harness.state import TrainState, capture_rng, model_sha256, restore_rng
from tests import runs
from tests.checkpoint.test_checkpoint import advance, ckpt_cfg, flip, make_state, save_steps
from tests.gcs_emulator import running_fake_gcs

# ---------------------------------------------------------------- quarantine


def test_a_restore_past_a_corrupt_step_quarantines_it_and_can_commit_that_step_again(tmp_path):
    hashes = save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 3)
    flip(tmp_path / "local" / step_dirname(3))
    state = make_state(seed=1)
    manager = CheckpointManager(ckpt_cfg(tmp_path), Dist())
    assert manager.restore(state).step == 2 and model_sha256(state.model) == hashes[2]
    local = LocalStore(str(tmp_path / "local"))
    assert local.committed_steps() == [1, 2]
    (held,) = local.quarantined()
    assert held.reason["step"] == 3 and "crc32c" in held.reason["reason"]
    assert held.reason["incarnation"] == manager.incarnation and held.reason["when"]
    advance(state)  # step 3 again: the old trap (CommitConflict on the existing step_3) is gone
    manager.save(3, state)
    manager.close()
    assert manager.conflict is None and local.committed_steps() == [1, 2, 3]
    local.verify(3)


def test_steps_newer_than_the_restored_one_are_quarantined_on_every_tier(tmp_path):
    """The bucket lags the local tier: step 3 is local only and fails verification there; steps on
    the pd tier that are newer than what was restored move aside too."""
    slower = {"name": "pd", "url": str(tmp_path / "pd"), "keep": 5, "every": 1}
    cfg = ckpt_cfg(tmp_path, slower_tiers=[slower])
    save_steps(CheckpointManager(cfg, Dist()), make_state(), 3)
    flip(tmp_path / "local" / step_dirname(3))
    flip(tmp_path / "pd" / step_dirname(3))
    manager = CheckpointManager(cfg, Dist())
    assert manager.restore(make_state(seed=4)).step == 2
    for tier in ("local", "pd"):
        store = LocalStore(str(tmp_path / tier))
        assert store.committed_steps() == [1, 2]
        assert [q.reason["step"] for q in store.quarantined()] == [3]


def test_cli_shows_quarantined_checkpoints_and_purges_them_on_request(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 2)
    flip(tmp_path / "local" / step_dirname(2))
    CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(make_state())
    store = str(tmp_path / "local")
    cli = [sys.executable, "-m", "harness.checkpoint"]
    listing = subprocess.run([*cli, "list", store], capture_output=True, text=True, env=runs.env())
    assert listing.returncode == 0, listing.stdout
    assert "quarantined" in listing.stdout and "crc32c" in listing.stdout
    purge = subprocess.run([*cli, "purge-quarantine", store], capture_output=True, text=True, env=runs.env())
    assert purge.returncode == 0 and "removed 1" in purge.stdout
    assert LocalStore(store).quarantined() == [] and LocalStore(store).committed_steps() == [1]


def test_gcs_quarantine_uncommits_the_step_keeps_its_objects_and_moves_latest_back(tmp_path, fake_gcs):
    fake_gcs.make_bucket("quarantine")
    url = "gs://quarantine/run"
    cfg = ckpt_cfg(tmp_path / "a", store=url)
    hashes = save_steps(CheckpointManager(cfg, Dist()), make_state(), 3)
    bucket = fake_gcs.client().bucket("quarantine")
    store = GCSStore(url)
    manifest = store.read_manifest(3)
    name = f"run/{step_dirname(3)}/{manifest.attempt}/{sorted(manifest.files)[0]}"
    data = bytearray(bucket.blob(name).download_as_bytes())
    data[len(data) // 2] ^= 0xFF
    bucket.blob(name).upload_from_string(bytes(data))  # a corrupted object under the same name
    state = make_state(seed=2)
    report = CheckpointManager(ckpt_cfg(tmp_path / "b", store=url), Dist()).restore(state)  # blank local disk
    assert report.step == 2 and model_sha256(state.model) == hashes[2]
    assert store.committed_steps() == [2] or store.committed_steps()[-1] == 2
    assert store.latest_step() == 2
    (held,) = store.quarantined()
    assert held.reason["step"] == 3 and "crc32c" in held.reason["reason"]
    kept = {b.name for b in bucket.list_blobs(prefix=f"run/quarantine/{held.name}/")}
    assert f"run/quarantine/{held.name}/{MANIFEST}" in kept and f"run/quarantine/{held.name}/{REASON}" in kept
    assert len(kept) == len(manifest.files) + 2, "every data object is kept"
    assert not list(bucket.list_blobs(prefix=f"run/{step_dirname(3)}/"))


# ---------------------------------------------------------------- retention and promotion


@pytest.fixture
def slow_link(monkeypatch):
    """A link to GCS slower than the local disk, as on a VM: each object upload takes 0.3 s longer
    (latency injected in front of the real upload to the emulator)."""
    real = GCSStore._upload

    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GCSStore, "_upload", slow)


def test_retention_with_gcs_as_the_only_slower_tier_never_deletes_what_a_promotion_copies(tmp_path, fake_gcs,
                                                                                           slow_link):
    fake_gcs.make_bucket("retain")
    tier = {"name": "gcs", "url": "gs://retain/run", "keep": 2, "every": 1}
    manager = CheckpointManager(ckpt_cfg(tmp_path, keep=2, slower_tiers=[tier], ephemeral=True), Dist())
    local = LocalStore(str(tmp_path / "local"))
    state = make_state()
    for _ in range(24):
        advance(state)
        manager.save(state.progress.step, state)
        manager._wait_inflight()
        pinned = set().union(*(p.pinned() for p in manager._promoters))
        held = local.committed_steps()
        assert len(held) <= 2 + len(pinned) and pinned <= set(held), (held, pinned)
    manager.close()
    (promoter,) = manager._promoters
    assert promoter.superseded > 0, "the test must exercise superseded promotions"
    assert manager.counters["failed"] == 0, "a promotion lost its source (deleted mid-upload)"
    assert local.committed_steps() == [23, 24], "superseded checkpoints piled up on the local tier"
    gcs = GCSStore("gs://retain/run")
    assert gcs.committed_steps()[-1] == 24 and len(gcs.committed_steps()) <= 2
    gcs.verify(24)


def test_an_emergency_save_that_cannot_reach_a_durable_tier_says_so(tmp_path):
    """An unmeasured tier is estimated from its assumed bandwidth, not as free: a copy that cannot fit
    the deadline is not tried, and the report is `ok: false` on the ephemeral tier."""
    slower = {"name": "pd", "url": str(tmp_path / "pd"), "every": 100, "assumed_bandwidth_mb_s": 0.001}
    manager = CheckpointManager(ckpt_cfg(tmp_path, slower_tiers=[slower], ephemeral=True), Dist())
    state = make_state()
    advance(state)
    report = manager.save_now(1, state, deadline_s=5)
    manager.close()
    assert not report.ok and report.tier == "local"
    assert LocalStore(str(tmp_path / "pd")).committed_steps() == []


def test_an_abandoned_copy_commits_nothing(tmp_path, fake_gcs):
    fake_gcs.make_bucket("abandon")
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 1)
    local = LocalStore(str(tmp_path / "local"))
    store = GCSStore("gs://abandon/run")
    stop = threading.Event()
    stop.set()
    with pytest.raises(TransferAbandoned):
        store.put_committed(1, local.step_dir(1), local.read_manifest(1), Transfer(stop=stop))
    with pytest.raises(TransferAbandoned):
        store.put_committed(1, local.step_dir(1), local.read_manifest(1), Transfer(deadline=time.monotonic()))
    assert store.committed_steps() == []


def test_the_emergency_copy_abandons_a_background_copy_and_stays_inside_its_deadline(tmp_path, fake_gcs,
                                                                                      slow_link):
    fake_gcs.make_bucket("deadline")
    tier = {"name": "gcs", "url": "gs://deadline/run", "keep": 3, "every": 1}
    manager = CheckpointManager(ckpt_cfg(tmp_path, slower_tiers=[tier], ephemeral=True), Dist())
    state = make_state()
    advance(state)
    manager.save(1, state)
    (promoter,) = manager._promoters
    runs.wait_for(lambda: 1 in promoter.pinned() and promoter._inflight, timeout=30, what="an upload in flight")
    advance(state)
    t0 = time.monotonic()
    report = manager.save_now(2, state, deadline_s=20)
    assert time.monotonic() - t0 < 20 and report.ok and report.tier == "gcs"
    manager.close()
    steps = GCSStore("gs://deadline/run").committed_steps()
    assert 2 in steps
    assert promoter.holds == set(steps)


# ---------------------------------------------------------------- listing failures


def test_a_tier_that_cannot_be_listed_fails_the_restore_naming_it(tmp_path):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("gone")
        cfg = ckpt_cfg(tmp_path, store="gs://gone/run", list_retry_s=2, remote_retry_s=1)
        manager = CheckpointManager(cfg, Dist())
        gcs.stop()
        t0 = time.monotonic()
        with pytest.raises(TierUnavailable, match=r"gs://gone/run.*checkpoint.list_retry_s"):
            manager.restore(make_state())
        assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- no unpickling


class Payload:
    """Runs a command when unpickled: what an attacker with bucket write access would plant."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.path)],))


def recommit(step_dir):
    """Rewrite the manifest so the planted files verify (the attacker can write it too)."""
    manifest = Manifest.from_json((step_dir / MANIFEST).read_text(), "m")
    manifest.files = {p.name: file_entry(p) for p in step_dir.iterdir() if p.name != MANIFEST}
    (step_dir / MANIFEST).write_text(manifest.to_json())


def test_a_pickle_payload_in_the_dcp_metadata_is_refused_and_never_runs(tmp_path):
    hashes = save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 2)
    victim, planted = tmp_path / "local" / step_dirname(2), tmp_path / "pwned"
    (victim / ".metadata").write_bytes(pickle.dumps(Payload(planted)))
    recommit(victim)
    state = make_state(seed=3)
    assert CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(state).step == 1
    assert not planted.exists(), "the checkpoint ran code"
    assert model_sha256(state.model) == hashes[1]
    (held,) = LocalStore(str(tmp_path / "local")).quarantined()
    assert "subprocess.call" in held.reason["reason"]


def test_a_pickle_payload_in_a_non_tensor_entry_is_refused_naming_it(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 1)
    state, planted = make_state(), tmp_path / "pwned"
    advance(state)
    advance(state)
    evil = state.to_dcp()
    evil["optim"]["param_groups"][0]["lr"] = Payload(planted)
    victim = tmp_path / "local" / step_dirname(2)
    shutil.copytree(tmp_path / "local" / step_dirname(1), victim)
    for f in victim.glob("*.distcp"):
        f.unlink()
    dcp.save(evil, checkpoint_id=victim, no_dist=True)
    (victim / MANIFEST).write_text((victim / MANIFEST).read_text().replace('"step": 1', '"step": 2'))
    recommit(victim)
    restored = make_state(seed=3)
    assert CheckpointManager(ckpt_cfg(tmp_path), Dist()).restore(restored).step == 1
    assert not planted.exists(), "the checkpoint ran code"
    (held,) = LocalStore(str(tmp_path / "local")).quarantined()
    assert "param_groups" in held.reason["reason"]


def test_progress_and_rng_are_tensors_in_the_checkpoint(tmp_path):
    save_steps(CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(), 1)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from harness.checkpoint.safe_load import read_metadata

    saved = read_metadata(tmp_path / "local" / step_dirname(1)).state_dict_metadata
    ours = {k: v for k, v in saved.items() if k == "progress" or k.startswith("rng_rank0")}
    assert ours and all(isinstance(v, TensorStorageMetadata) for v in ours.values()), ours


# ---------------------------------------------------------------- exactness at the edges


def test_rng_round_trip_and_rewind_to_the_step_boundary():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state too
    saved = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1), np.random.randn())
    restore_rng(saved)
    again = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1), np.random.randn())
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and first[3:] == again[3:]
    state = TrainState(torch.nn.Linear(2, 2), None, rank=0)  # type: ignore[arg-type]
    state.mark_step_boundary()
    masks = torch.rand(4)
    state.rewind_to_step_boundary()  # an abandoned step is redone with the same draws
    assert torch.equal(masks, torch.rand(4))


def batch_cfg(**train):
    return OmegaConf.create({"train": {"global_batch_size": 10, "micro_batch_size": 2, "grad_accum": None, **train},
                             "elastic": {"lr_scaling": "none"}})


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 7, 10])
def test_every_world_size_gets_a_valid_split(world_size):
    cfg = batch_cfg()
    plan = BatchPlan.for_world(cfg.train, cfg.elastic, world_size)
    assert plan.micro_batch <= 2 and plan.micro_batch * plan.grad_accum * world_size == plan.global_batch
    assert plan.global_batch == (10 if 10 % world_size == 0 else 10 // world_size * world_size)


def test_a_world_size_without_a_split_fails_at_launch_naming_the_keys():
    with pytest.raises(config.ConfigError, match=r"train.global_batch_size=4.*launch.nnodes"):
        config.load(["train.global_batch_size=4", "launch.nnodes=1:4", "launch.nproc_per_node=2",
                     "launch.standalone=false"])


def test_the_cadence_retries_a_failed_save_once_then_follows_its_interval():
    cadence = Cadence(10, max_steps=100, start_step=0)
    saved = []
    for step in range(1, 31):
        if cadence.due(step):
            cadence.saved(step)
            saved.append(step)
    assert saved == [10, 20, 30]
    cadence.failed()
    assert cadence.due(31)
    cadence.saved(31)
    cadence.failed()  # the retry failed too: back to the interval
    assert not cadence.due(32) and cadence.due(41)
    assert Cadence(10, max_steps=25, start_step=20).due(25), "the last step is always saved"


def test_a_local_slower_tier_in_a_multi_node_job_fails_at_launch_naming_it():
    with pytest.raises(config.ConfigError, match=r"checkpoint.slower_tiers\[0\].url='/mnt/pd/ckpt' is a local path"):
        config.load(["launch.nnodes=1:4", "launch.standalone=false", "checkpoint.slower_tiers=[{url:/mnt/pd/ckpt}]"])
    config.load(["launch.nnodes=1", "checkpoint.slower_tiers=[{url:/mnt/pd/ckpt}]"])
