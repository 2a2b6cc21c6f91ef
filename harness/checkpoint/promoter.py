"""Copies of committed checkpoints from the first tier to one slower tier (local SSD -> bucket, PD), each
tier in a thread of its own. The engine (manager.py) talks to a promoter through a narrow interface:
what to copy (`offer`, `copy_now` in an emergency), what it pins (`pinned()`: the first tier's
retention keeps exactly those), what it holds (`holds`, the steps it committed there), its bandwidth
(`estimate_seconds`) and a `report` callback; it reaches into nothing else of the engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from harness.checkpoint.manifest import Manifest
from harness.checkpoint.report import Kind, Report
from harness.checkpoint.retention import retain
from harness.checkpoint.store import CommitConflict, LocalStore, Transfer, TransferAbandoned
from harness.checkpoint.tiers import Tier

log = logging.getLogger("harness.checkpoint")

class Promoter:
    """Copies committed checkpoints from the first tier to one slower tier, in a thread of its own.
    At most one copy in flight and one pending; a newer checkpoint replaces the pending one (newest
    wins). What it owns it also releases: `pinned()` is exactly the in-flight and pending steps, so
    the first tier's retention keeps them and nothing else, on every path (supersede, emergency,
    failure, close)."""

    def __init__(self, source: LocalStore, tier: Tier, share: bool, assumed_bytes_per_s: float,
                 report: Callable[[Report], None]):
        self.source = source
        self.tier = tier
        self.share = share and tier.store.takes_shares
        self.bytes_per_s = assumed_bytes_per_s  # until measured: configured, conservative
        self.report = report
        self.conflict: CommitConflict | None = None
        self.holds: set[int] = set()  # steps this promoter committed on its tier (verified on the way)
        self.superseded = 0
        self._pending: tuple[int, Manifest] | None = None
        self._inflight: tuple[int, threading.Event] | None = None
        self._cv = threading.Condition()
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
                self.superseded += 1
                log.info("promotion of step %d to %s superseded by step %d", self._pending[0], self.tier, step)
            self._pending = (step, manifest)
            self._cv.notify_all()

    def pinned(self) -> set[int]:
        with self._cv:
            return {s for s in (self._pending and self._pending[0], self._inflight and self._inflight[0])
                    if s is not None}

    def estimate_seconds(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_s

    def copy_now(self, step: int, manifest: Manifest, deadline: float) -> bool:
        """The emergency copy, in the caller's thread and within `deadline`: a background copy of
        the same step may finish it; any other one is abandoned (left uncommitted) and the pending
        one dropped."""
        with self._cv:
            self._pending = None
            if self._inflight and self._inflight[0] == step:
                self._cv.wait_for(lambda: self._inflight is None or self._inflight[0] != step,
                                  timeout=max(0.0, deadline - time.monotonic()))
                if step in self.holds:
                    return True
            if self._inflight:
                log.warning("emergency save: abandoning the copy of step %d to %s", self._inflight[0], self.tier)
                self._inflight[1].set()
        return self._copy(step, manifest, Transfer(deadline=deadline))

    def _copy(self, step: int, manifest: Manifest, transfer: Transfer) -> bool:
        t0 = time.perf_counter()
        src = self.source.step_dir(step)
        store = self.tier.store
        try:
            if step not in store.committed_steps():
                if self.share:
                    if not store.put_share(step, src, manifest, transfer):  # type: ignore[attr-defined]
                        log.info("step %d: this node's share is on %s; the last node to finish commits it",
                                 step, self.tier)
                else:
                    store.put_committed(step, src, manifest, transfer)
            elif (theirs := store.read_manifest(step).attempt) != manifest.attempt:
                raise CommitConflict(store.url, step, manifest.attempt, theirs)
            self.holds.add(step)
            retain(self.tier, set(), self.holds, self.report)
        except CommitConflict as err:
            self.conflict = err
            log.error("%s", err)
            self.report(Report(Kind.PROMOTE, step, self.tier.name, ok=False, detail=str(err)))
            return False
        except TransferAbandoned as err:
            log.warning("copy of step %d to %s: %s", step, self.tier, err)
            self.report(Report(Kind.PROMOTE, step, self.tier.name, ok=False, detail=str(err)))
            return False
        except Exception as err:  # noqa: BLE001 - a slow tier's outage must not stop training
            log.error("copy of step %d to %s failed: %s", step, self.tier, err)
            self.report(Report(Kind.PROMOTE, step, self.tier.name, ok=False, detail=str(err)))
            return False
        seconds = time.perf_counter() - t0
        self.bytes_per_s = manifest.total_bytes / max(seconds, 1e-6)
        self._since_last, self._last_time = 0, time.monotonic()
        self.report(Report(Kind.PROMOTE, step, self.tier.name, seconds, manifest.total_bytes))
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (step, manifest), self._pending = self._pending, None
                stop = threading.Event()
                self._inflight = (step, stop)
            try:
                self._copy(step, manifest, Transfer(stop=stop))
            finally:
                with self._cv:
                    self._inflight = None
                    self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._pending is None and self._inflight is None)
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
