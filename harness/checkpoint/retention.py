"""Which committed checkpoints a tier keeps: its K newest, the ones a copy in flight needs, and always
its newest that verifies. Used by the engine for its first tier and by each promoter for its own."""

from __future__ import annotations

import logging
from collections.abc import Callable

from harness.checkpoint.manifest import CorruptCheckpoint
from harness.checkpoint.report import Kind, Report
from harness.checkpoint.store import StoreError
from harness.checkpoint.tiers import Tier

log = logging.getLogger("harness.checkpoint")


def retain(tier: Tier, pinned: set[int], verified: set[int], report: Callable[[Report], None]) -> None:
    """Keep the tier's K newest checkpoints, the pinned ones (a promotion is copying them) and always
    its newest that verifies (fully: a manifest that merely reads is not enough). `verified` caches
    the steps known whole. A failed delete is reported, never raised."""
    steps = tier.store.committed_steps()
    newest_good = None
    for step in reversed(steps):
        if step in verified or _verifies(tier, step):
            verified.add(step)
            newest_good = step
            break
    for step in steps[: max(0, len(steps) - tier.keep)]:
        if step == newest_good or step in pinned:
            continue
        try:
            tier.store.delete(step)
            verified.discard(step)
        except Exception as err:  # noqa: BLE001
            log.warning("retention: could not delete step %d from %s: %s", step, tier, err)
            report(Report(Kind.RETENTION, step, tier.name, ok=False, detail=str(err)))


def _verifies(tier: Tier, step: int) -> bool:
    try:
        tier.store.verify(step)
        return True
    except (CorruptCheckpoint, StoreError, OSError):
        return False
