"""Failure bookkeeping shared by every telemetry writer: a sink that is down must cost the training loop
nothing, so each failure is counted, logged only the first time (and on recovery), and the next attempt
is pushed out exponentially instead of hammering an unreachable service."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

OnError = Callable[[str, str, int], None]  # (sink, error, errors so far)


class Backoff:
    def __init__(self, sink: str, initial_s: float = 5.0, max_s: float = 300.0,
                 on_error: OnError | None = None, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.initial_s = initial_s
        self.max_s = max_s
        self.on_error = on_error
        self.clock = clock
        self.errors = 0
        self._delay = 0.0
        self._next = 0.0
        self._failing = False

    def ready(self) -> bool:
        """Whether an attempt is due: always while healthy, after the back-off delay while failing."""
        return self.clock() >= self._next

    def wait_s(self) -> float:
        """Seconds until the next attempt is due."""
        return max(0.0, self._next - self.clock())

    def failed(self, err: BaseException) -> None:
        self.errors += 1
        self._delay = min(self.max_s, self._delay * 2 if self._delay else self.initial_s)
        self._next = self.clock() + self._delay
        message = f"{type(err).__name__}: {err}"[:500]
        if not self._failing:
            log.warning("telemetry sink %s failed (training continues; retrying with back-off): %s",
                        self.sink, message)
        self._failing = True
        if self.on_error is not None:
            try:
                self.on_error(self.sink, message, self.errors)
            except Exception:  # the error reporter must not become a second failure
                log.debug("on_error callback for %s raised", self.sink, exc_info=True)

    def succeeded(self) -> None:
        if self._failing:
            log.warning("telemetry sink %s recovered after %d errors", self.sink, self.errors)
        self._failing = False
        self._delay = 0.0
        self._next = 0.0
