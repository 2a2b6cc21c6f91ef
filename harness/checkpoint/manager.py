"""The checkpoint engine: asynchronous saves, atomic commits, promotion to slower tiers, retention,
verified restore, and the emergency `save_now`.

The path of a periodic save: the loop calls `save`, which waits only while this rank's share of the
state is copied into host buffers allocated ahead of time (snapshot.py; `prepare` decides the shares
and starts the allocation); a writer thread then runs DCP into an attempt directory of the first tier,
every rank reports the size and CRC32C of the files it wrote (computed as they were written,
dcp_writer.py), each node leader checks that every file of its node is there with its size, writes
the manifest and renames the directory into place (the commit). A snapshot that cannot get its host
memory is a failed save, agreed by every rank like any other failure.
Committed checkpoints are copied to slower tiers in the background, newest first, and each tier
keeps its K newest and always its newest verified one.

One outcome for all ranks: every step of a save that can fail on one rank (preparing, DCP, the file
list, the commit) is followed by a gather of every rank's result, so all ranks see the same outcome
(committed, failed, or a conflict with another writer) and `last_committed` is the same everywhere.
The loop still has to stop all ranks at one step boundary: it shares `conflict` through its
per-step agreement.

A restore never traps the run: copies that fail verification, and committed steps newer than the one
restored, are quarantined (see store.py), so the restored run can commit those steps again.

The engine knows nothing of preemption or telemetry: it reports what it did (`drain_reports`).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from harness.checkpoint.dcp_writer import ChecksummingWriter
from harness.checkpoint.manifest import CorruptCheckpoint, FileEntry, Manifest
from harness.checkpoint.promoter import Promoter
from harness.checkpoint.report import Kind, Report
from harness.checkpoint.retention import retain
from harness.checkpoint.safe_load import SafeLoadPlanner, SafeReader
from harness.checkpoint.snapshot import SnapshotFailed, Snapshotter, share_out
from harness.checkpoint.store import CommitConflict, LocalStore, StoreError
from harness.checkpoint.tiers import Tier, build_tiers
from harness.distributed import Dist, all_gather_object, broadcast_object
from harness.state import TrainState

if TYPE_CHECKING:
    from harness.config import CheckpointConfig

log = logging.getLogger("harness.checkpoint")

UNCOMMITTED_GRACE_S = 3600.0


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not fit the configured model or optimizer (never loaded partially)."""


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none verifies: refuse to start over them rather than bury them."""


class TierUnavailable(StoreError):
    """A tier could not be listed within `checkpoint.list_retry_s`: restore refuses to guess that it
    holds nothing (that would start the job from step 0). Restartable."""


SHARE_OF = "share_of_node"  # manifest meta of a node's share in its own tier
RESTORE_BASE_TIMEOUT_S = 300.0  # collectives around restore wait this long plus the bytes' estimate
PROGRESS_LOG_S = 10.0


@dataclass
class _Outcome:
    """What every rank learns about one save: committed, failed (with the first reason) or conflict."""

    committed: bool
    detail: str = ""
    conflict: CommitConflict | None = None
    manifest: Manifest | None = None
    committed_here: bool = False  # this node's leader renamed its attempt into place


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, d: Dist):
        self.cfg = cfg
        self.dist = d
        self.tiers: list[Tier] = build_tiers(cfg)
        self.first: LocalStore = self.tiers[0].store  # type: ignore[assignment]
        self.scratch = Path(cfg.scratch_dir)
        for tier in self.tiers:
            tier.store.check_access()
        self.incarnation = broadcast_object(d, uuid.uuid4().hex[:8], group=d.ckpt_group)
        self.node = d.node
        self.snapshotter = Snapshotter(d.rank)
        self._prepared = False
        self.reports: queue.Queue[Report] = queue.Queue()
        self.counters = {"saves": 0, "skipped": 0, "waited": 0, "failed": 0, "quarantined": 0}
        self.last_committed: int | None = None  # the same on every rank (see _write_and_commit)
        self._committed_manifest: Manifest | None = None  # job-wide (a node's own tier has its share)
        self._conflict: CommitConflict | None = None
        self._restored_from: tuple[int, Tier] | None = None
        self._verified: set[int] = set()  # first-tier steps known whole: committed after the file check
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._inflight: Future | None = None
        # Several nodes: each node's first tier holds only its own ranks' files, so each leader puts its
        # share into a shared tier and the last one to finish commits (GCSStore.put_share).
        self.multi_node = d.world_size > int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
        self._promoters = [
            Promoter(self.first, tier, self.multi_node, self._assumed_bytes_per_s(tier), self._report)
            for tier in self.tiers[1:]
        ] if d.is_node_leader else []
        if d.is_node_leader:
            for tier in self.tiers:
                self._cleanup_uncommitted(tier)

    @property
    def conflict(self) -> CommitConflict | None:
        """Another writer owns the store: this incarnation is stale and must stop (all ranks, at the
        step boundary where any rank first sees it)."""
        return self._conflict or next((p.conflict for p in self._promoters if p.conflict), None)

    def _assumed_bytes_per_s(self, tier: Tier) -> float:
        return (tier.assumed_bandwidth_mb_s or self.cfg.assumed_bandwidth_mb_s) * 1e6

    def _report(self, report: Report) -> None:
        if not report.ok and report.kind in (Kind.COMMIT, Kind.PROMOTE, Kind.RETENTION):
            self.counters["failed"] += 1
        self.reports.put(report)

    # ---------------------------------------------------------------- saving

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def prepare(self, state: TrainState) -> None:
        """Collective, once the state holds everything a save copies (the loop calls it after the first
        step of each process, when the optimizer has its state): rank 0 splits the tensors replicated on
        every rank among the ranks, every rank receives the split, and this rank's buffers are
        allocated in the background. Saves before it copy everything (DCP writes each tensor once).
        Later calls return at once. The split travels on the default group, which only the training
        thread uses (the writer's collectives run on the checkpoint group)."""
        if self._prepared:
            return
        self._prepared = True
        sd = state.to_dcp()
        owner = share_out(sd, self.dist.world_size) if self.dist.is_main else None
        self.snapshotter.owner = broadcast_object(self.dist, owner)
        self.snapshotter.allocate_in_background(sd)

    def save(self, step: int, state: TrainState, skip: bool = False) -> Report:
        """A periodic save; returns once this rank's share is snapshotted. `skip` must be agreed by all
        ranks (the loop learns whether any rank is still busy through its per-step collective)."""
        if skip:
            self.counters["skipped"] += 1
            log.warning("checkpoint at step %d skipped: previous save still in flight (if_busy=skip)", step)
            return Report(Kind.SAVE, step, ok=False, detail="skipped: previous save in flight")
        t0 = time.perf_counter()
        waited = self._wait_inflight()
        snap, failure = self._snapshot(state)
        self._inflight = self._writer.submit(self._write_and_commit, step, snap, state.progress.sample_index,
                                             failure=failure)
        blocking = time.perf_counter() - t0
        self.counters["saves"] += 1
        return Report(Kind.SAVE, step, self.tiers[0].name, blocking, self.snapshotter.bytes, ok=failure is None,
                      detail=failure or "", extra={"waited_s": waited,
                                                   "allocated_bytes": self.snapshotter.allocated_in_take})

    def _snapshot(self, state: TrainState) -> tuple[dict[str, Any] | None, str | None]:
        """This rank's share of the state in host buffers, or the reason it could not be had; the writer
        shares that outcome with every rank (a rank alone must not skip a collective save)."""
        try:
            return self.snapshotter.take(state.to_dcp()), None
        except SnapshotFailed as err:
            log.error("checkpoint snapshot failed: %s", err)
            return None, str(err)

    def save_now(self, step: int, state: TrainState, deadline_s: float) -> Report:
        """Make the current state durable on the fastest durable tier that fits the deadline, never
        waiting past it for a slower tier. Collective: the report (tier, ok) is the same on every rank."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + deadline_s
        self._wait_inflight()
        if self.last_committed != step:
            snap, failure = self._snapshot(state)
            self._write_and_commit(step, snap, state.progress.sample_index, promote=False, failure=failure)
        reached: Tier | None = None
        if self.last_committed == step:
            reached = self._durable_home(step)
            if reached is None and self.dist.is_node_leader:
                reached = self._promote_within(step, deadline) or self.tiers[0]
            reached = reached or self.tiers[0]
        homes = all_gather_object(self.dist, (self.dist.is_node_leader, reached.name if reached else "",
                                              bool(reached and not reached.ephemeral)), group=self.dist.ckpt_group)
        leaders = [(name, durable) for leader, name, durable in homes if leader]
        seconds = time.perf_counter() - t0
        durable = all(d for _, d in leaders) and seconds <= deadline_s
        tier = leaders[0][0] if all(name == leaders[0][0] for name, _ in leaders) else ",".join(n for n, _ in leaders)
        report = Report(Kind.EMERGENCY, step, tier, seconds, self.snapshotter.bytes, ok=durable,
                        detail=f"deadline {deadline_s:.1f}s")
        self.reports.put(report)
        log.warning("emergency checkpoint of step %d on %s in %.2fs (%s)", step, tier or "no tier", seconds,
                    "durable" if durable else "NOT durable")
        return report

    def _durable_home(self, step: int) -> Tier | None:
        """A non-ephemeral tier already known to hold `step` (the first tier, or where it was restored from)."""
        if not self.tiers[0].ephemeral:
            return self.tiers[0]
        if self._restored_from and self._restored_from[0] == step and not self._restored_from[1].ephemeral:
            return self._restored_from[1]
        return next((p.tier for p in self._promoters if step in p.holds and not p.tier.ephemeral), None)

    def _wait_inflight(self) -> float:
        if not self.busy:
            return 0.0
        t0 = time.perf_counter()
        self.counters["waited"] += 1
        self._inflight.result()  # type: ignore[union-attr]
        waited = time.perf_counter() - t0
        log.info("checkpoint waited %.2fs for the previous save to finish (if_busy=wait)", waited)
        return waited

    def _gather_failures(self, error: str | None, group: Any = None) -> str | None:
        """Collective: the first rank's error of this phase, or None if every rank succeeded."""
        errors = all_gather_object(self.dist, error, group=group or self.dist.ckpt_group)
        return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)

    def _write_and_commit(self, step: int, snap: dict[str, Any] | None, sample_index: int, promote: bool = True,
                          failure: str | None = None) -> None:
        """Writer thread: DCP into an attempt directory, gather CRCs, leaders commit; never raises.
        Every rank makes the same collective calls whatever fails where, so no rank is left waiting;
        `failure` is this rank's reason it has no snapshot."""
        t0 = time.perf_counter()
        attempt = f"{self.incarnation}-{step}"
        attempt_dir = self.first.attempt_dir(step, attempt)
        outcome = self._save_collectively(step, snap, sample_index, attempt, attempt_dir, failure)
        if outcome.conflict:
            self._conflict = outcome.conflict
            log.error("%s", outcome.conflict)
        if not outcome.committed:
            if self.dist.is_node_leader:
                shutil.rmtree(attempt_dir, ignore_errors=True)  # ours, never committed
                if outcome.committed_here:  # this node's part of a save that failed elsewhere
                    self.first.delete(step)
            if not outcome.conflict:
                log.error("checkpoint of step %d failed in %s: %s", step, self.tiers[0], outcome.detail)
            self._report(Report(Kind.COMMIT, step, self.tiers[0].name, ok=False, detail=outcome.detail))
            return
        self.last_committed = step
        manifest = self._committed_manifest = outcome.manifest
        assert manifest is not None
        if self.dist.is_node_leader:
            self._verified.add(step)
            self._retain_first()
        self._report(Report(Kind.COMMIT, step, self.tiers[0].name, time.perf_counter() - t0, manifest.total_bytes))
        if promote:
            for promoter in self._promoters:
                promoter.offer(step, manifest)

    def _save_collectively(self, step: int, snap: dict[str, Any] | None, sample_index: int, attempt: str,
                           attempt_dir: Path, failure: str | None) -> _Outcome:
        d = self.dist
        error = failure
        if error is None:
            try:
                attempt_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                error = f"cannot create {attempt_dir}: {err}"
        if failed := self._gather_failures(error):
            return _Outcome(False, failed)
        writer = ChecksummingWriter(attempt_dir, sync_files=True, thread_count=self.cfg.write_threads)
        try:  # DCP gathers every rank's planning and writing errors and raises on all ranks alike
            with _without_zip_crc32():
                dcp.save(snap, storage_writer=writer, process_group=d.ckpt_group)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a failed save must not kill training
            return _Outcome(False, f"DCP save failed: {str(err).strip().splitlines()[-1]}")
        mine: dict[str, FileEntry] = {name: e for name, e in writer.entries.items() if _written_by(name, d.rank)}
        parts = all_gather_object(d, (self.node, mine), group=d.ckpt_group)
        entries = {name: entry for _, files in parts for name, entry in files.items()}
        meta = {"sample_index": sample_index}
        manifest = Manifest(step=step, files=entries, attempt=attempt, world_size=d.world_size, meta=meta)
        error, conflict, committed_here = None, None, False
        if d.is_node_leader:
            ours = {name: entry for node, files in parts if node == self.node for name, entry in files.items()}
            # Several nodes: this node's first tier holds its share, under a manifest of its own (so
            # the share verifies); the job-wide manifest goes to the shared tier with every share.
            local = manifest if not self.multi_node else Manifest(
                step=step, files=ours, attempt=attempt, world_size=d.world_size,
                meta={**meta, SHARE_OF: self.node, "job_files": len(entries)})
            try:
                _check_listed_files(attempt_dir, local, set(ours))
                self.first.commit(attempt_dir, local)
                committed_here = True
            except CommitConflict as err:
                conflict, error = err, str(err)
            except (CorruptCheckpoint, OSError, StoreError) as err:
                error = f"not committed: {err}"
        results = all_gather_object(d, (error, conflict is not None, str(conflict or "")), group=d.ckpt_group)
        if any(c for _, c, _ in results):
            theirs = conflict or CommitConflict(self.first.url, step, attempt, "reported by another node")
            return _Outcome(False, next(m for _, c, m in results if c), theirs, committed_here=committed_here)
        if failed := next((f"rank {r}: {e}" for r, (e, _, _) in enumerate(results) if e), None):
            return _Outcome(False, failed, committed_here=committed_here)
        return _Outcome(True, manifest=manifest)

    def _promote_within(self, step: int, deadline: float) -> Tier | None:
        """Copy `step` synchronously to the first durable tier whose expected time fits before
        `deadline`; an in-flight background copy is abandoned when the time is needed."""
        manifest = self._committed_manifest
        if manifest is None or manifest.step != step:  # restored from the first tier: one node, whole
            try:
                manifest = self.first.read_manifest(step)
            except CorruptCheckpoint as err:
                log.error("emergency save: step %d is not readable in %s: %s", step, self.tiers[0], err)
                return None
        for promoter in self._promoters:
            if promoter.tier.ephemeral:
                continue
            budget = deadline - time.monotonic()
            estimate = promoter.estimate_seconds(manifest.total_bytes)
            if estimate > budget:
                log.warning("emergency save: %s would take ~%.1fs, %.1fs left", promoter.tier, estimate, budget)
                continue
            if promoter.copy_now(step, manifest, deadline):
                return promoter.tier
        return None

    # ------------------------------------------------------------ retention

    def _retain_first(self) -> None:
        pinned = set().union(*(p.pinned() for p in self._promoters))
        retain(self.tiers[0], pinned, self._verified, self._report)

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
        agree on the step; copies that fail verification and steps newer than the restored one are
        quarantined (only once a step restores: over nothing usable the run refuses to start)."""
        t0 = time.perf_counter()
        d = self.dist
        listed, error = (self._list_tiers() if d.is_node_leader else ({}, None))
        listings = all_gather_object(d, (d.is_node_leader, listed, error), group=d.ckpt_group)
        if failed := next((e for _, _, e in listings if e), None):
            raise TierUnavailable(failed)
        leaders = [set().union(*steps.values()) if steps else set() for leader, steps, _ in listings if leader]
        candidates = sorted(set.intersection(*leaders), reverse=True) if leaders else []
        if not candidates:
            return None
        group = self._restore_group(candidates[0], listed)
        try:
            rejected: list[tuple[Tier, int, str, bool]] = []
            for step in candidates:
                where, problems = self._locate(step) if d.is_node_leader else (None, [])
                for tier, reason, corrupt in problems:
                    log.warning("skipping checkpoint step %d on %s: %s", step, tier, reason)
                    rejected.append((tier, step, reason, corrupt))
                located = all_gather_object(d, (self.node, d.is_node_leader, where), group=group)
                paths = {n: w for n, leader, w in located if leader}
                if any(w is None for w in paths.values()):
                    continue
                directory, tier_name = paths[self.node]
                if problem := self._load(Path(directory), state, group):
                    log.warning("skipping checkpoint step %d on %s: %s", step, tier_name, problem)
                    rejected.append((self._tier(tier_name), step, problem, True))
                    continue
                self.last_committed = step
                self._restored_from = (step, self._tier(tier_name))
                if self._restored_from[1] is self.tiers[0]:
                    self._verified.add(step)
                self._after_restore(step, Path(directory), listed, rejected, group)
                report = Report(Kind.RESTORE, step, tier_name, time.perf_counter() - t0,
                                extra={"skipped": [f"{t.name}: {r}" for t, _, r, _ in rejected]})
                self.reports.put(report)
                return report
        finally:
            if group is not d.ckpt_group:
                torch_dist.destroy_process_group(group)
        raise NoUsableCheckpoint(
            "no checkpoint verifies, refusing to start over them: "
            + "; ".join(f"{t.name} step {s}: {r}" for t, s, r, _ in rejected)
            + ". Move them aside (python -m harness.checkpoint list STORE shows why) or point "
            "checkpoint.store elsewhere."
        )

    def _tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def _list_tiers(self) -> tuple[dict[str, set[int]], str | None]:
        """Each tier's committed steps, retrying a failing listing with backoff up to
        `checkpoint.list_retry_s`; (listing, None) or ({}, the error naming the tier)."""
        listed: dict[str, set[int]] = {}
        for tier in self.tiers:
            deadline, delay = time.monotonic() + self.cfg.list_retry_s, 0.5
            while True:
                try:
                    listed[tier.name] = set(tier.store.committed_steps())
                    break
                except Exception as err:  # noqa: BLE001 - reported below, naming the tier
                    if time.monotonic() + delay > deadline:
                        return {}, (f"cannot list checkpoints in {tier}: {err}; retried for "
                                    f"{self.cfg.list_retry_s:.0f}s (checkpoint.list_retry_s). Not starting "
                                    "from step 0 while a tier that may hold checkpoints is unreachable.")
                    log.warning("cannot list %s (retrying in %.1fs): %s", tier, delay, err)
                    time.sleep(delay)
                    delay = min(delay * 2, 8.0)
        return listed, None

    def _restore_group(self, newest: int, listed: dict[str, set[int]]):
        """A gloo group whose timeout covers verifying and downloading the newest candidate at the
        assumed bandwidth, so the ranks waiting for their node leader never time out first."""
        d = self.dist
        nbytes = 0
        if d.is_node_leader:
            for tier in self.tiers:
                if newest in listed.get(tier.name, ()):
                    try:
                        nbytes = tier.store.read_manifest(newest).total_bytes
                        break
                    except (CorruptCheckpoint, StoreError, OSError):
                        continue
        nbytes = max(all_gather_object(d, nbytes, group=d.ckpt_group))
        timeout = RESTORE_BASE_TIMEOUT_S + 3 * nbytes / (self.cfg.assumed_bandwidth_mb_s * 1e6)
        if not d.enabled or timeout <= RESTORE_BASE_TIMEOUT_S + 1:
            return d.ckpt_group
        log.info("restore of %.1f GB: collectives wait up to %.0fs", nbytes / 1e9, timeout)
        return torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))

    def _locate(self, step: int) -> tuple[tuple[str, str] | None, list[tuple[Tier, str, bool]]]:
        """(local directory, tier name) of a verified copy of `step`, and the problems met on the way:
        (tier, reason, whether the copy is corrupt rather than unreachable). In a multi-node job only
        shared tiers count: a node's local share holds the files its own ranks wrote, but DCP writes
        a replicated (DDP) tensor once job-wide, so every rank reads files of other nodes' shares."""
        problems: list[tuple[Tier, str, bool]] = []
        for tier in self.tiers:
            if self.multi_node and tier.store.is_local:
                continue
            try:
                if step not in tier.store.committed_steps():
                    continue
                with _progress(f"verifying step {step} on {tier}"):
                    manifest = tier.store.verify(step)
                if SHARE_OF in manifest.meta:  # one node's part of a multi-node checkpoint: the bucket has it whole
                    continue
                with _progress(f"fetching step {step} from {tier}"):
                    directory = tier.store.fetch(step, self.scratch)
                return (str(directory), tier.name), problems
            except CorruptCheckpoint as err:
                problems.append((tier, str(err), True))
            except (StoreError, OSError) as err:
                problems.append((tier, str(err), False))
        return None, problems

    def _after_restore(self, step: int, directory: Path, listed: dict[str, set[int]],
                       rejected: list[tuple[Tier, int, str, bool]], group) -> None:
        """Quarantine what cannot be trusted, then remove the scratch copy once every rank has loaded."""
        d = self.dist
        if d.is_node_leader:
            doomed = {(tier.name, s): reason for tier, s, reason, corrupt in rejected if corrupt}
            for tier in self.tiers:
                for newer in sorted(listed.get(tier.name, ())):
                    if newer > step:
                        doomed.setdefault((tier.name, newer), f"newer than step {step}, which the run restored")
            for (name, bad), reason in sorted(doomed.items()):
                tier = self._tier(name)
                if tier.store.is_local or d.is_main:  # a shared tier is moved by rank 0 only
                    self._quarantine(tier, bad, reason)
        if d.enabled:
            torch_dist.barrier(group=group)
        if d.is_node_leader and directory.is_relative_to(self.scratch):
            shutil.rmtree(directory, ignore_errors=True)

    def _quarantine(self, tier: Tier, step: int, reason: str) -> None:
        record = {"step": step, "tier": tier.name, "store": tier.store.url, "reason": reason,
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "incarnation": self.incarnation}
        try:
            where = tier.store.quarantine(step, record)
        except (StoreError, OSError) as err:
            log.error("could not quarantine step %d of %s: %s", step, tier, err)
            return
        self.counters["quarantined"] += 1
        log.warning("quarantined step %d of %s -> %s (%s)", step, tier, where, reason)

    def _load(self, directory: Path, state: TrainState, group) -> str | None:
        """Load a verified copy into `state`; the reason (the same on every rank) if it cannot be
        loaded safely. Config drift (CheckpointMismatch) raises: that is the user's to fix."""
        reader = SafeReader(directory)
        error, target = None, state.to_dcp()
        try:
            saved = reader.read_metadata().state_dict_metadata
        except CorruptCheckpoint as err:
            error, saved = str(err), {}
        if failed := self._gather_failures(error, group):
            return failed
        saved = {key: meta for key, meta in saved.items() if not state.is_other_ranks(key)}
        if state.rng_key not in {key.split(".", 1)[0] for key in saved}:
            target.pop(state.rng_key)
            log.warning("checkpoint has no RNG state for rank %d (world size changed); RNG stays seeded",
                        self.dist.rank)
        for key in state.VARIABLE_SIZE:
            if isinstance(saved.get(key), TensorStorageMetadata):
                target[key] = torch.empty(tuple(saved[key].size), dtype=target[key].dtype)
        _check_fits(target, saved, directory)
        try:  # DCP raises on every rank when any rank's read fails
            dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(str(directory)), process_group=group)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - e.g. an entry that needs unpickling
            return f"cannot be loaded safely: {str(err).strip().splitlines()[-1]}"
        state.load_dcp_state(target)
        return None

    def drain_reports(self) -> list[Report]:
        out = []
        while True:
            try:
                out.append(self.reports.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Finish the in-flight save and pending promotions; then the steps they pinned go too."""
        self._wait_inflight()
        self._writer.shutdown(wait=True)
        for promoter in self._promoters:
            promoter.close()
        if self._promoters:
            self._retain_first()


def _check_listed_files(directory: Path, manifest: Manifest, names: set[str]) -> None:
    """Before a commit: every file of this node that the manifest lists is there with its size."""
    for name in sorted(names):
        path = directory / name
        expected = manifest.files[name].size
        if not path.is_file():
            raise CorruptCheckpoint(str(path), "listed in the manifest but missing: not committing")
        if (size := path.stat().st_size) != expected:
            raise CorruptCheckpoint(str(path), f"size {size} bytes, {expected} when written: not committing")


class _progress:
    """Logs a long restore phase every PROGRESS_LOG_S seconds, from a timer thread, until it ends."""

    def __init__(self, what: str):
        self.what = what
        self._done = threading.Event()

    def __enter__(self) -> None:
        self._t0 = time.monotonic()
        threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._done.wait(PROGRESS_LOG_S):
            log.info("%s: %.0fs so far", self.what, time.monotonic() - self._t0)

    def __exit__(self, *exc: object) -> None:
        self._done.set()

def _without_zip_crc32():
    """DCP writes through torch.save, whose zip writer CRC32s every record; the manifest's CRC32C already
    covers every byte, so the writer skips that pass (a process-wide setting, restored afterwards)."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


def _written_by(name: str, rank: int) -> bool:
    """DCP file naming: `__<rank>_<n>.distcp` per rank; the coordinator (rank 0) writes `.metadata`."""
    return name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata")


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
