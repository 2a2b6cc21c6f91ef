"""Live progress on global rank 0: a rich bar (step, loss, steps/s, ETA) on a terminal, plain log
lines every `log_interval` steps otherwise."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressDisplay:
    def __init__(self, max_steps: int, start_step: int, enabled: bool, log_interval: int):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.max_steps = max_steps
        self._t_last = time.perf_counter()
        self._steps_since = 0
        self.steps_per_s = 0.0
        self._bar = None
        if enabled and sys.stdout.isatty():
            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} steps/s"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=max_steps, completed=start_step, loss=float("nan"),
                                            rate=0.0)
            self._bar.start()

    def shows(self, step: int) -> bool:
        """Whether `update(step, ...)` displays: every `log_interval` steps and the last. The loop reads
        the loss to the host only at these steps (a read waits for the device)."""
        return step % self.log_interval == 0 or step == self.max_steps

    def update(self, step: int, loss: float | None, step_seconds: float) -> None:
        """`loss`: the step's loss, read; None where `shows(step)` is False (nothing displays it)."""
        if not self.enabled:
            return
        self._steps_since += 1
        if not self.shows(step):
            return
        now = time.perf_counter()
        self.steps_per_s = self._steps_since / max(now - self._t_last, 1e-9)
        self._t_last, self._steps_since = now, 0
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, rate=self.steps_per_s)
        else:
            eta = (self.max_steps - step) / max(self.steps_per_s, 1e-9)
            print(f"step {step}/{self.max_steps} loss {loss:.4f} {self.steps_per_s:.1f} steps/s "
                  f"eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
