"""When to checkpoint: one decision for all ranks.

Rank 0 owns the cadence and its answer travels to every rank in the per-step agreement, so the ranks'
k-th saves are always the same step (two ranks pairing their saves across different steps commit a
checkpoint with half its files). With `checkpoint.interval_steps=auto` the interval follows
Young/Daly from job-wide inputs: the slowest rank's blocking time (the agreement's maximum) and the
ledger's MTBI. A failed save is retried once at the next step boundary, then the cadence resumes.

Young/Daly: between two checkpoints the job computes for tau seconds and then blocks for C; an interruption
loses on average tau/2 of computation. Badput per second is C/tau + tau/(2 M) for a mean time between
interruptions M, smallest at tau = sqrt(2 C M) (Young 1974; Daly 2006 to first order). The
`sqrt(2 M C / L)` variant found in some guides is not dimensionally a time; it is not used.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def young_daly_interval_s(checkpoint_cost_s: float, mtbi_s: float) -> float:
    """Seconds of training between checkpoints that minimise expected badput."""
    if checkpoint_cost_s < 0:
        raise ValueError(f"checkpoint cost {checkpoint_cost_s} s must be >= 0")
    if not mtbi_s > 0:
        raise ValueError(f"MTBI {mtbi_s} s must be > 0")
    return math.sqrt(2.0 * checkpoint_cost_s * mtbi_s)


def interval_steps(checkpoint_cost_s: float, mtbi_s: float, step_time_s: float, max_steps: int) -> int:
    """The Young/Daly interval in whole steps, within [1, max_steps]."""
    if not step_time_s > 0:
        raise ValueError(f"step time {step_time_s} s must be > 0")
    steps = round(young_daly_interval_s(checkpoint_cost_s, mtbi_s) / step_time_s)
    return max(1, min(max_steps, steps))


def estimate_mtbi_s(running_s: float, interruptions: int, prior_mtbi_s: float) -> float:
    """MTBI observed so far, with the configured value counted as one prior interruption, so that a
    young job with no interruption yet keeps the prior and every interruption pulls toward the data."""
    return (running_s + prior_mtbi_s) / (interruptions + 1)


class AdaptiveInterval:
    """`checkpoint.interval_steps=auto`: re-evaluated from smoothed measurements; a change smaller than
    `min_change` (relative) is ignored so the interval does not flap with measurement noise."""

    def __init__(self, max_steps: int, initial_steps: int, smoothing: float = 0.3, min_change: float = 0.2):
        self.max_steps = max_steps
        self.interval_steps = max(1, min(max_steps, initial_steps))
        self.smoothing = smoothing
        self.min_change = min_change
        self._blocking_s: float | None = None
        self._step_time_s: float | None = None

    def update(self, blocking_s: float, step_time_s: float, mtbi_s: float) -> int:
        """Fold in one measurement of checkpoint blocking and step time; returns the interval to use."""
        self._blocking_s = self._smooth(self._blocking_s, blocking_s)
        self._step_time_s = self._smooth(self._step_time_s, step_time_s)
        best = interval_steps(self._blocking_s, mtbi_s, self._step_time_s, self.max_steps)
        if abs(best - self.interval_steps) > self.min_change * self.interval_steps:
            log.info("checkpoint interval %d -> %d steps (blocking %.3f s, step %.3f s, MTBI %.0f s)",
                     self.interval_steps, best, self._blocking_s, self._step_time_s, mtbi_s)
            self.interval_steps = best
        return self.interval_steps

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)


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
