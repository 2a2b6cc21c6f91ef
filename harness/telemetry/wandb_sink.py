"""One W&B run per job, across every restart: the run id comes from the ledger's `job_start` event and
every incarnation re-attaches with `resume="allow"`.

All wandb calls (init included, which can take seconds or fail when online) run on one background
thread fed by a bounded queue: `log_step` and `log_job` only enqueue, so the training loop pays a
queue put. Rows wait in the queue while W&B comes up; a full queue drops (and counts) new rows.
With `wait_for_start`, W&B comes up only at `start()` (or `close()`): the trainer calls it after its
first step, so wandb's import and service process stay off a restart's way to that step.
A sweep's jobs share `wandb.group` (the sweep's name), so W&B shows them side by side.
Charts use the training step as their x axis (`define_metric(..., step_metric=STEP)`) rather than
wandb's internal step, so steps recomputed after a restart are accepted, not dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.telemetry.backoff import Backoff, OnError

STEP = "train/step"
_STOP = object()


class WandbSink:
    def __init__(self, cfg_wandb: Mapping[str, Any], run_id: str, config: Mapping[str, Any],
                 name: str | None = None, queue_size: int = 10_000, on_error: OnError | None = None,
                 retry_initial_s: float = 5.0, retry_max_s: float = 300.0, wait_for_start: bool = False):
        self.cfg = dict(cfg_wandb)
        self.run_id = run_id
        self.config = dict(config)
        self.name = name
        self.backoff = Backoff("wandb", retry_initial_s, retry_max_s, on_error)
        self._full = 0  # rows refused by a full queue (counted on the caller's thread)
        self._unlogged = 0  # rows the worker could not log (counted on its thread)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._run: Any = None
        self._exit_code = 0
        self._closing = threading.Event()
        self._started = threading.Event()
        if not wait_for_start:
            self._started.set()
        self._thread = threading.Thread(target=self._work, name="wandb-sink", daemon=True)
        self._thread.start()

    @property
    def errors(self) -> int:
        return self.backoff.errors

    @property
    def dropped(self) -> int:
        """Rows not logged: queue full, W&B not (yet) available, or a failed log call."""
        return self._full + self._unlogged

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._put({STEP: step, **{f"train/{k}": v for k, v in metrics.items()}})

    def log_job(self, step: int, metrics: Mapping[str, float]) -> None:
        self._put({STEP: step, **{f"job/{k}": v for k, v in metrics.items()}})

    def start(self) -> None:
        """Bring W&B up now (a sink made with `wait_for_start`)."""
        self._started.set()

    def close(self, exit_code: int = 0, timeout_s: float = 10.0) -> bool:
        """Log what is queued and finish the run; False when that did not happen within the timeout
        (the thread is abandoned). Rows queued while W&B never came up are dropped."""
        deadline = time.monotonic() + timeout_s
        self._exit_code = exit_code
        self._closing.set()
        self._started.set()
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.05)
                break
            except queue.Full:  # a worker still logging makes room; one waiting for W&B exits
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def _put(self, row: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._full += 1

    def _work(self) -> None:
        # Until W&B is up, rows wait in the queue (bounded); init is retried with back-off.
        self._started.wait()
        while self._run is None:
            if self.backoff.ready():
                self._init()
            if self._run is None and self._closing.wait(max(0.01, self.backoff.wait_s())):
                self._unlogged += self._queue.qsize()
                return
        while (row := self._queue.get()) is not _STOP:
            try:
                self._run.log(row)
            except Exception as err:
                self._unlogged += 1
                self.backoff.failed(err)
        try:
            self._run.finish(exit_code=self._exit_code)
        except Exception as err:
            self.backoff.failed(err)

    def _init(self) -> None:
        try:
            import wandb

            if self.cfg.get("dir"):
                Path(self.cfg["dir"]).mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.cfg.get("project"), entity=self.cfg.get("entity"), dir=self.cfg.get("dir"),
                mode=self.cfg.get("mode", "offline"), id=self.run_id, resume="allow", name=self.name,
                group=self.cfg.get("group"), config=self.config, allow_val_change=True,
                settings=wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                        x_disable_stats=True, x_disable_machine_info=True),
            )
            run.define_metric(STEP)
            run.define_metric("train/*", step_metric=STEP)
            run.define_metric("job/*", step_metric=STEP)
        except Exception as err:
            self.backoff.failed(err)
            return
        self._run = run
        self.backoff.succeeded()
