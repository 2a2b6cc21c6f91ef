"""The checkpoint engine: asynchronous saves, atomic commits, promotion to slower tiers, retention,
verified restore, and the emergency `save_now`.

The path of a periodic save: the loop calls `save`, which waits only while the state is copied into
reused host buffers; a writer thread then runs DCP into an attempt directory of the first tier, every
rank reports the CRC32C of the files it wrote, and each node leader writes the manifest and renames
the directory into place (the commit). Committed checkpoints are copied to slower tiers in the
background, newest first, and each tier keeps its K newest.

The engine knows nothing of preemption or telemetry: it reports what it did (`drain_reports`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from harness.checkpoint.manifest import CorruptCheckpoint, FileEntry, Manifest, file_entry
from harness.checkpoint.snapshot import Snapshotter
from harness.checkpoint.store import CommitConflict, LocalStore, StoreError
from harness.checkpoint.tiers import Tier, build_tiers
from harness.distributed import Dist, all_gather_object, broadcast_object
from harness.state import TrainState

log = logging.getLogger("harness.checkpoint")

UNCOMMITTED_GRACE_S = 3600.0


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not fit the configured model or optimizer (never loaded partially)."""


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none verifies: refuse to start over them rather than bury them."""


@dataclass
class Report:
    """What the engine did, for the loop to forward to telemetry."""

    kind: str  # save | commit | promote | emergency | restore | retention | error
    step: int
    tier: str = ""
    seconds: float = 0.0
    bytes: int = 0
    ok: bool = True
    detail: str = ""
    extra: dict = field(default_factory=dict)


class CheckpointManager:
    def __init__(self, cfg, d: Dist):
        self.cfg = cfg
        self.dist = d
        self.tiers: list[Tier] = build_tiers(cfg)
        self.first: LocalStore = self.tiers[0].store  # type: ignore[assignment]
        self.scratch = Path(cfg.scratch_dir)
        for tier in self.tiers:
            tier.store.check_access()
        self.incarnation = broadcast_object(d, uuid.uuid4().hex[:8], group=d.ckpt_group)
        self.snapshotter = Snapshotter()
        self.reports: queue.Queue[Report] = queue.Queue()
        self.counters = {"saves": 0, "skipped": 0, "waited": 0, "failed": 0, "promote_skipped": 0}
        self.last_committed: int | None = None
        self.conflict: CommitConflict | None = None  # another writer owns the store: this one must stop
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._inflight: Future | None = None
        # Several nodes: each node's first tier holds only its own ranks' files, so each leader puts its
        # share into a shared tier and the last one to finish commits (GCSStore.put_share).
        self.multi_node = d.world_size > int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
        self._promoters = [_Promoter(self, t) for t in self.tiers[1:]] if d.is_node_leader else []
        self._pinned: set[int] = set()  # steps a promoter is copying: retention leaves them alone
        if d.is_node_leader:
            for tier in self.tiers:
                self._cleanup_uncommitted(tier)

    # ---------------------------------------------------------------- saving

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def save(self, step: int, state: TrainState, skip: bool = False) -> Report:
        """A periodic save; returns once the state is snapshotted. `skip` must be agreed by all ranks
        (the loop learns whether any rank is still busy through its per-step collective)."""
        if skip:
            self.counters["skipped"] += 1
            log.warning("checkpoint at step %d skipped: previous save still in flight (if_busy=skip)", step)
            return Report("save", step, ok=False, detail="skipped: previous save in flight")
        t0 = time.perf_counter()
        waited = self._wait_inflight()
        snap = self.snapshotter.take(state.to_dcp())
        self._inflight = self._writer.submit(self._write_and_commit, step, snap, state.progress.sample_index)
        blocking = time.perf_counter() - t0
        self.counters["saves"] += 1
        return Report("save", step, self.tiers[0].name, blocking, self.snapshotter.bytes,
                      extra={"waited_s": waited})

    def save_now(self, step: int, state: TrainState, deadline_s: float) -> Report:
        """Make the current state durable on the fastest durable tier that fits the deadline."""
        t0 = time.perf_counter()
        self._wait_inflight()
        reached = self.tiers[0]
        if self.last_committed != step:
            snap = self.snapshotter.take(state.to_dcp())
            self._write_and_commit(step, snap, state.progress.sample_index, promote=False)
        if reached.ephemeral and self.dist.is_node_leader:
            reached = self._promote_within(step, deadline_s - (time.perf_counter() - t0)) or reached
        seconds = time.perf_counter() - t0
        report = Report("emergency", step, reached.name, seconds, self.snapshotter.bytes,
                        ok=seconds <= deadline_s, detail=f"deadline {deadline_s:.1f}s")
        self.reports.put(report)
        log.warning("emergency checkpoint of step %d durable on %s in %.2fs", step, reached, seconds)
        return report

    def _wait_inflight(self) -> float:
        if not self.busy:
            return 0.0
        t0 = time.perf_counter()
        self.counters["waited"] += 1
        self._inflight.result()  # type: ignore[union-attr]
        waited = time.perf_counter() - t0
        log.info("checkpoint waited %.2fs for the previous save to finish (if_busy=wait)", waited)
        return waited

    def _write_and_commit(self, step: int, snap: dict[str, Any], sample_index: int, promote: bool = True) -> None:
        """Writer thread: DCP into an attempt directory, gather CRCs, leaders commit; never raises."""
        t0 = time.perf_counter()
        attempt = f"{self.incarnation}-{step}"
        attempt_dir = self.first.attempt_dir(step, attempt)
        try:
            attempt_dir.mkdir(parents=True, exist_ok=True)
            writer = FileSystemWriter(attempt_dir, sync_files=True, thread_count=self.cfg.write_threads)
            with _without_zip_crc32():
                dcp.save(snap, storage_writer=writer, process_group=self.dist.ckpt_group)
            mine = {p.name: file_entry(p) for p in attempt_dir.iterdir() if _written_by(p.name, self.dist.rank)}
            entries: dict[str, FileEntry] = {}
            for part in all_gather_object(self.dist, mine, group=self.dist.ckpt_group):
                entries.update(part)
            manifest = Manifest(step=step, files=entries, attempt=attempt, world_size=self.dist.world_size,
                                meta={"sample_index": sample_index})
            if self.dist.is_node_leader:
                self.first.commit(attempt_dir, manifest)
                self._retain(self.tiers[0])
        except CommitConflict as err:
            self.conflict = err
            log.error("%s", err)
            self.reports.put(Report("commit", step, self.tiers[0].name, ok=False, detail=str(err)))
            return
        except Exception as err:  # noqa: BLE001 - a failed save must not kill training
            self.counters["failed"] += 1
            log.error("checkpoint of step %d failed in %s: %s", step, self.tiers[0], err)
            self.reports.put(Report("commit", step, self.tiers[0].name, ok=False, detail=str(err)))
            return
        self.last_committed = step
        seconds = time.perf_counter() - t0
        self.reports.put(Report("commit", step, self.tiers[0].name, seconds, manifest.total_bytes))
        if promote:
            for promoter in self._promoters:
                promoter.offer(step, manifest)

    def _promote_within(self, step: int, budget_s: float) -> Tier | None:
        """Copy `step` synchronously to the first durable tier whose measured speed fits the budget."""
        manifest = self.first.read_manifest(step)
        for promoter in self._promoters:
            if promoter.tier.ephemeral:
                continue
            estimate = promoter.estimate_seconds(manifest.total_bytes)
            if estimate > budget_s:
                log.warning("emergency save: %s would take ~%.1fs, %.1fs left", promoter.tier, estimate, budget_s)
                continue
            if promoter.copy(step, manifest, wait_idle=True):
                return promoter.tier
        return None

    # ------------------------------------------------------------ retention

    def _retain(self, tier: Tier) -> None:
        """Keep the tier's K newest checkpoints, and always its newest that verifies; a failed delete
        is logged and counted, never raised."""
        steps = tier.store.committed_steps()
        newest_good = next((s for s in reversed(steps) if _quick_ok(tier, s)), None)
        for step in steps[: max(0, len(steps) - tier.keep)]:
            if step == newest_good or step in self._pinned:
                continue
            try:
                tier.store.delete(step)
            except Exception as err:  # noqa: BLE001
                self.counters["failed"] += 1
                log.warning("retention: could not delete step %d from %s: %s", step, tier, err)
                self.reports.put(Report("retention", step, tier.name, ok=False, detail=str(err)))

    def _cleanup_uncommitted(self, tier: Tier) -> None:
        try:
            removed = tier.store.cleanup_uncommitted(UNCOMMITTED_GRACE_S if not tier.store.is_local else 0.0)
        except Exception as err:  # noqa: BLE001
            log.warning("could not clean uncommitted leftovers in %s: %s", tier, err)
            return
        if removed:
            log.info("removed %d uncommitted leftovers from %s: %s", len(removed), tier, ", ".join(removed))

    # ------------------------------------------------------------- restore

    def restore(self, state: TrainState) -> Report | None:
        """Load the newest checkpoint that verifies, read from the fastest tier holding it. All ranks
        agree on the step; a checkpoint that fails verification is skipped with a warning."""
        t0 = time.perf_counter()
        mine = self._listed_steps()
        listings = all_gather_object(self.dist, sorted(mine), group=self.dist.ckpt_group)
        candidates = sorted(set.intersection(*map(set, listings)), reverse=True)
        rejected: list[str] = []
        node = os.environ.get("GROUP_RANK", "0")
        for step in candidates:
            where, problems = self._locate(step) if self.dist.is_node_leader else (None, [])
            for problem in problems:
                log.warning("skipping checkpoint step %d: %s", step, problem)
            rejected.extend(problems)
            located = all_gather_object(self.dist, (node, self.dist.is_node_leader, where),
                                        group=self.dist.ckpt_group)
            paths = {n: w for n, leader, w in located if leader}
            if all(w is not None for w in paths.values()):
                directory, tier_name = paths[node]
                self._load(Path(directory), state)
                self.last_committed = step
                report = Report("restore", step, tier_name, time.perf_counter() - t0,
                                extra={"skipped": rejected})
                self.reports.put(report)
                return report
        if candidates:
            raise NoUsableCheckpoint(
                "no checkpoint verifies, refusing to start over them: " + "; ".join(rejected)
                + ". Move them aside or point checkpoint.store elsewhere."
            )
        return None

    def _listed_steps(self) -> set[int]:
        steps: set[int] = set()
        for tier in self.tiers:
            try:
                steps.update(tier.store.committed_steps())
            except Exception as err:  # noqa: BLE001 - an unreachable slow tier must not block a resume
                log.warning("cannot list %s: %s", tier, err)
        return steps

    def _locate(self, step: int) -> tuple[tuple[str, str] | None, list[str]]:
        """(local directory, tier name) of a verified copy of `step`, and the problems met on the way."""
        problems = []
        for tier in self.tiers:
            try:
                if step not in tier.store.committed_steps():
                    continue
                tier.store.verify(step)
                directory = tier.store.fetch(step, self.scratch)
                return (str(directory), tier.name), problems
            except (CorruptCheckpoint, StoreError, OSError) as err:
                problems.append(f"{tier.name}: {err}")
        return None, problems

    def _load(self, directory: Path, state: TrainState) -> None:
        reader = FileSystemReader(directory)
        saved = reader.read_metadata().state_dict_metadata
        target = state.to_dcp()
        if state.rng_key not in saved:
            target.pop(state.rng_key)
            log.warning("checkpoint has no RNG state for rank %d (world size changed); RNG stays seeded",
                        self.dist.rank)
        _check_fits(target, saved, directory)
        dcp.load(target, storage_reader=reader, process_group=self.dist.ckpt_group)
        state.load_dcp_state(target)

    def drain_reports(self) -> list[Report]:
        out = []
        while True:
            try:
                out.append(self.reports.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Finish the in-flight save and pending promotions."""
        self._wait_inflight()
        self._writer.shutdown(wait=True)
        for promoter in self._promoters:
            promoter.close()


def _without_zip_crc32():
    """DCP writes through torch.save, whose zip writer CRC32s every record; the manifest's CRC32C already
    covers every byte, so the writer skips that pass (a process-wide setting, restored afterwards)."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


def _written_by(name: str, rank: int) -> bool:
    """DCP file naming: `__<rank>_<n>.distcp` per rank; the coordinator (rank 0) writes `.metadata`."""
    return name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata")


def _quick_ok(tier: Tier, step: int) -> bool:
    try:
        tier.store.read_manifest(step)
        return True
    except (CorruptCheckpoint, StoreError, OSError):
        return False


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _check_fits(target: dict[str, Any], saved: dict[str, Any], directory: Path) -> None:
    """Refuse a checkpoint whose tensors differ from the configured model/optimizer, naming the key."""
    want = {k: v for k, v in _flatten(target).items() if isinstance(v, torch.Tensor)}
    have = {k: v for k, v in saved.items() if isinstance(v, TensorStorageMetadata)}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise CheckpointMismatch(f"{directory}: '{key}' is in the configured model/optimizer but not in "
                                     "the checkpoint (config drift?)")
        if key not in want:
            raise CheckpointMismatch(f"{directory}: '{key}' is in the checkpoint but not in the configured "
                                     "model/optimizer (config drift?)")
        if tuple(have[key].size) != tuple(want[key].shape):
            raise CheckpointMismatch(f"{directory}: '{key}' has shape {tuple(have[key].size)} in the checkpoint "
                                     f"but {tuple(want[key].shape)} in the configured model")


class _Promoter:
    """Copies committed checkpoints from the first tier to one slower tier, in a thread of its own.
    At most one copy in flight; a newer checkpoint replaces a pending older one (newest wins)."""

    def __init__(self, manager: CheckpointManager, tier: Tier):
        self.manager = manager
        self.tier = tier
        self.bytes_per_s = 0.0  # measured
        self._pending: tuple[int, Manifest] | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._since_last = 0
        self._last_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-promote-{tier.name}", daemon=True)
        self._thread.start()

    def offer(self, step: int, manifest: Manifest) -> None:
        self._since_last += 1
        due_count = self._since_last >= self.tier.every
        due_time = self.tier.every_seconds > 0 and time.monotonic() - self._last_time >= self.tier.every_seconds
        if not (due_count or due_time):
            return
        with self._cv:
            if self._pending is not None:
                self.manager.counters["promote_skipped"] += 1
                log.info("promotion of step %d to %s superseded by step %d", self._pending[0], self.tier, step)
            self._pending = (step, manifest)
            self.manager._pinned.add(step)
            self._cv.notify_all()

    def estimate_seconds(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_s if self.bytes_per_s else 0.0

    def copy(self, step: int, manifest: Manifest, wait_idle: bool = False) -> bool:
        if wait_idle:
            with self._cv:
                self._pending = None
                self._cv.wait_for(lambda: not self._busy)
                self._busy = True
        t0 = time.perf_counter()
        src = self.manager.first.step_dir(step)
        try:
            if step not in self.tier.store.committed_steps():
                if self.manager.multi_node and hasattr(self.tier.store, "put_share"):
                    if not self.tier.store.put_share(step, src, manifest):
                        log.info("step %d: this node's share is on %s; the last node to finish commits it",
                                 step, self.tier)
                else:
                    self.tier.store.put_committed(step, src, manifest)
            elif (theirs := self.tier.store.read_manifest(step).attempt) != manifest.attempt:
                raise CommitConflict(f"checkpoint store {self.tier.store.url!r}: step {step} was already committed "
                                     f"by another writer (attempt {theirs}); ours ({manifest.attempt}) is abandoned")
            self.manager._retain(self.tier)
        except CommitConflict as err:
            self.manager.conflict = err
            log.error("%s", err)
            self.manager.reports.put(Report("promote", step, self.tier.name, ok=False, detail=str(err)))
            return False
        except Exception as err:  # noqa: BLE001 - a slow tier's outage must not stop training
            self.manager.counters["failed"] += 1
            log.error("copy of step %d to %s failed: %s", step, self.tier, err)
            self.manager.reports.put(Report("promote", step, self.tier.name, ok=False, detail=str(err)))
            return False
        finally:
            if wait_idle:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        seconds = time.perf_counter() - t0
        self.bytes_per_s = manifest.total_bytes / max(seconds, 1e-6)
        self._since_last, self._last_time = 0, time.monotonic()
        self.manager.reports.put(Report("promote", step, self.tier.name, seconds, manifest.total_bytes))
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (step, manifest), self._pending = self._pending, None
                self._busy = True
            try:
                self.copy(step, manifest)
            finally:
                with self._cv:
                    self._busy = False
                    self.manager._pinned.discard(step)
                    self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._pending is None and not self._busy)
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
