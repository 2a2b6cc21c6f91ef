"""When to checkpoint: one decision for all ranks.

Rank 0 owns the cadence and its answer travels to every rank in the per-step agreement, so the ranks'
k-th saves are always the same step (two ranks pairing their saves across different steps commit a
checkpoint with half its files). With `checkpoint.interval_steps=auto` the interval follows
Young/Daly from job-wide inputs: the slowest rank's blocking time (the agreement's maximum) and the
ledger's MTBI. A failed save is retried once at the next step boundary, then the cadence resumes.
"""

from __future__ import annotations

from harness.telemetry.interval import AdaptiveInterval

AUTO_INITIAL_INTERVAL = 50  # checkpoint.interval_steps=auto starts here, then follows Young/Daly


class Cadence:
    def __init__(self, interval_steps: int | str, max_steps: int, start_step: int):
        self.max_steps = max_steps
        self.adaptive = (AdaptiveInterval(max_steps, AUTO_INITIAL_INTERVAL) if interval_steps == "auto" else None)
        self.every = AUTO_INITIAL_INTERVAL if self.adaptive else int(interval_steps)
        self.last_saved = start_step
        self._retry = False
        self._last_was_retry = False

    def due(self, step: int) -> bool:
        return step > self.last_saved and (
            self._retry or step - self.last_saved >= self.every or step == self.max_steps)

    def saved(self, step: int) -> None:
        self.last_saved, self._last_was_retry, self._retry = step, self._retry, False

    def failed(self) -> None:
        """A save failed on some rank (every rank learns the same outcome): retry it once, at the next
        boundary; a failed retry waits for the regular cadence."""
        self._retry = not self._last_was_retry

    def observe(self, blocking_s: float, step_time_s: float, mtbi_s: float) -> int | None:
        """Fold in the slowest rank's blocking time; the new interval when it changed, else None."""
        if self.adaptive is None:
            return None
        previous = self.every
        self.every = self.adaptive.update(blocking_s, step_time_s, mtbi_s)
        return self.every if self.every != previous else None
