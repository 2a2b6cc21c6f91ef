"""The snapshot's host buffers and the files' checksums (harness/checkpoint/snapshot.py, dcp_writer.py):
buffers allocated in the background before the first save, a save that comes before they are ready,
CRC32C computed while writing, and a rank short of memory failing its save without a crash."""

from __future__ import annotations

import json

from harness.checkpoint.manager import CheckpointManager
from harness.checkpoint.manifest import file_entry
from harness.checkpoint.snapshot import share_out, tensors_of
from harness.checkpoint.store import LocalStore
from harness.distributed import Dist
from harness.state import model_sha256
from tests import runs
from tests.checkpoint.test_checkpoint import advance, ckpt_cfg, make_state


def committed(manager: CheckpointManager, step: int) -> bool:
    manager.close()
    return any(r.kind == "commit" and r.step == step and r.ok for r in manager.drain_reports())


def restored_sha(tmp_path, n_layer: int) -> str:
    fresh = make_state(n_layer=n_layer, seed=1)
    manager = CheckpointManager(ckpt_cfg(tmp_path), Dist())
    manager.restore(fresh)
    manager.close()
    return model_sha256(fresh.model)


def test_buffers_allocated_in_the_background_leave_the_first_save_nothing_to_allocate(tmp_path):
    manager, state = CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(n_layer=4)
    advance(state)
    manager.prepare(state)
    assert manager.snapshotter.ready.wait(60), "the background allocation never ended"
    report = manager.save(1, state)
    assert report.ok and report.bytes > 0
    assert report.extra["allocated_bytes"] == 0, "the first save allocated what the background should have"
    assert committed(manager, 1)
    assert restored_sha(tmp_path, 4) == model_sha256(state.model)


def test_a_save_before_the_buffers_are_ready_allocates_the_rest_and_is_whole(tmp_path):
    manager, state = CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state(n_layer=6)
    advance(state)
    manager.prepare(state)
    report = manager.save(1, state)  # at once: the background thread is stopped after its current buffer
    whole = sum(t.numel() * t.element_size() for _, t in tensors_of(state.to_dcp()))
    assert report.ok and report.bytes == whole, "every tensor is copied, ready or not"
    assert 0 <= report.extra["allocated_bytes"] <= report.bytes
    advance(state)
    second = manager.save(2, state)
    assert second.extra["allocated_bytes"] == 0 and second.bytes == report.bytes, "every buffer is kept"
    assert committed(manager, 2)
    assert restored_sha(tmp_path, 6) == model_sha256(state.model)


def test_the_crc_computed_while_writing_equals_a_read_back(tmp_path):
    manager, state = CheckpointManager(ckpt_cfg(tmp_path), Dist()), make_state()
    advance(state)
    manager.save(1, state)
    assert committed(manager, 1)
    store = LocalStore(str(tmp_path / "local"))
    manifest = store.read_manifest(1)
    files = sorted(p.name for p in store.step_dir(1).iterdir() if p.name != "manifest.json")
    assert sorted(manifest.files) == files and ".metadata" in files
    for name in files:
        assert manifest.files[name] == file_entry(store.step_dir(1) / name), name


def test_replicated_tensors_are_split_evenly_by_bytes_and_each_goes_to_one_rank():
    state = make_state(n_layer=4)
    advance(state)
    sd = state.to_dcp()
    owner = share_out(sd, 2)
    sizes = {path: t.numel() * t.element_size() for path, t in tensors_of(sd)
             if path.split("/")[1] in ("model", "optim")}
    assert set(owner) == set(sizes), "every model and optimizer tensor has exactly one owner"
    per_rank = [sum(sizes[p] for p, r in owner.items() if r == rank) for rank in (0, 1)]
    assert max(per_rank) <= 0.55 * sum(per_rank), per_rank
    assert share_out(sd, 2) == owner, "the split is a function of the state alone"


def test_a_rank_short_of_memory_fails_that_save_on_every_rank_and_the_next_save_commits(tmp_path):
    log = tmp_path / "probe.log"
    proc = runs.torchrun_script(2, "tests/checkpoint/alloc_probe.py", [str(tmp_path / "store")], timeout=240)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, runs.tail(log)
    lines = [json.loads(line.split("probe: ", 1)[1]) for line in log.read_text().splitlines() if "probe: " in line]
    by_rank = {line["rank"]: line for line in lines}
    assert set(by_rank) == {0, 1}, runs.tail(log)
    short = by_rank[1]["short_of_memory"]
    assert not short["save_ok"] and "cannot allocate" in short["save_detail"], short
    for rank in (0, 1):
        assert by_rank[rank]["warmup"]["ok"]
        assert not by_rank[rank]["short_of_memory"]["ok"], "every rank learns the save failed"
        assert "rank 1: cannot allocate" in by_rank[rank]["short_of_memory"]["detail"]
        assert by_rank[rank]["after"]["ok"] and by_rank[rank]["after"]["save_ok"]
    store = LocalStore(str(tmp_path / "store" / "local"))
    assert store.committed_steps() == [1, 3]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")], "the failed attempt is cleaned"
