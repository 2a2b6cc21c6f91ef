"""Run a sweep's jobs on this machine: one after another, or `sweep.parallel` side by side (never more
than `sweep.max_concurrent`), each an ordinary `python -m harness.launch` (sweep.on=local) or a run on
the local Spot cloud, `python -m harness.chaos` (sweep.on=chaos), with preemptions.

Contract:
- Before any job starts every job's config is checked (harness/sweep/jobs.py `check`); then the
  finished jobs are skipped (their `finished` record reaches train.max_steps), and the others run in
  index order. A job that stopped before (killed, preempted, failed) is run again with the same
  overrides, so it resumes from its newest checkpoint, exactly as `make train` would. On the local
  Spot cloud a job's checkpoints live in the cloud's bucket, which ends with the cloud: an unfinished
  chaos job runs again from its start.
- Each job writes its output to `<job dir>/launch.log` (`chaos.log`), appended at every attempt; the
  sweep prints one line per start and end, rewrites sweep.json at every change and prints the table
  at the end.
- One sweep process per sweep at a time (a lock on `<sweep dir>/.lock`, released when it dies).
- SIGTERM or SIGINT stops the sweep like a preemption: no new job starts, the running ones get SIGTERM
  (they save and exit 75), their status is `preempted`, and the sweep exits 75. Exit 0 when every
  job finished, 1 when some did not.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.sweep import jobs as sweep_jobs
from harness.sweep import results
from harness.sweep.jobs import Job, Sweep
from harness.sweep.queue import durable_url
from harness.sweep.results import JobResult

POLL_S = 0.2
_PREFIX = re.compile(r"^\[(?:rank|default)\d*\]:\s?")
_EXCEPTION = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure|Conflict)"
                        r"\w*)(:\s.*)?$")


class SweepLocked(RuntimeError):
    """Another process runs this sweep."""


def root_cause(log_text: str, code: int) -> str:
    """Why a job failed, from its attempt's output: the first exception under torchrun's "Root Cause"
    (the original error of a chained traceback), else the harness's last `error:` line, else the code."""
    lines = [_PREFIX.sub("", line) for line in log_text.splitlines()]
    if (start := next((i for i, line in enumerate(lines) if line.startswith("Root Cause")), None)) is not None:
        for line in lines[start:]:
            if (m := _EXCEPTION.match(line)) and not line.lstrip().startswith("Traceback"):
                return f"{m.group(1)}{m.group(2) or ''}".strip()
    errors = [line.strip() for line in lines if re.match(r"^\s*(config )?error:", line)]
    if errors:
        return errors[-1]
    excs = [line.strip() for line in lines if _EXCEPTION.match(line)]
    return excs[0] if excs else f"exit code {code}"


@dataclass
class Running:
    job: Job
    proc: subprocess.Popen
    log: Path
    offset: int  # where this attempt's output starts in the log
    out: IO[bytes]


def initial_results(sweep: Sweep, composed: list[Any]) -> list[JobResult]:
    """Each job's result before it is observed: its train.max_steps and where its durable tier is (its
    last checkpoint tier here; the deployment's bucket on GCP; none on the local Spot cloud, whose
    bucket ended with it)."""
    out = []
    for job, cfg in zip(sweep.jobs, composed, strict=True):
        job_cfg = cfg[1] if isinstance(cfg, tuple) else cfg  # harness.chaos's compose: (job, cfg, settings)
        if sweep.cfg.on == "gcp":
            durable = durable_url(str(job_cfg.infra.bucket.name), job.run_name)
        elif sweep.cfg.on == "chaos":
            durable = None
        else:
            durable = str([job_cfg.checkpoint.store, *(t.url for t in job_cfg.checkpoint.slower_tiers)][-1])
        run_dir = None if sweep.cfg.on == "gcp" else str(sweep.job_dir(job))
        out.append(JobResult.of(job, int(job_cfg.train.max_steps), durable, run_dir))
    return out


def observe(sweep: Sweep, result: JobResult) -> JobResult:
    """`result` refreshed from what its job left (the live state is the runner's to add)."""
    fresh = JobResult(**{**result.__dict__, "status": "pending", "root_cause": None})
    if sweep.cfg.on == "chaos":
        return results.observe_chaos(fresh, sweep.job_dir(sweep.jobs[result.index]))
    return results.observe(fresh)


class Runner:
    def __init__(self, sweep: Sweep, composed: list[Any]):
        self.sweep = sweep
        self.on = sweep.cfg.on
        self.results = initial_results(sweep, composed)
        self.running: dict[int, Running] = {}
        self.stopping: str | None = None

    # ------------------------------------------------------------------ state

    def observe(self, index: int) -> JobResult:
        self.results[index] = observe(self.sweep, self.results[index])
        return self.results[index]

    def save(self) -> Path:
        return results.write(self.sweep.dir / results.FILE, results.document(self.sweep, self.results))

    # ------------------------------------------------------------------ jobs

    def command(self, job: Job) -> list[str]:
        if self.on == "chaos":
            return [sys.executable, "-m", "harness.chaos", *sweep_jobs.chaos_overrides(self.sweep, job)]
        return [sys.executable, "-m", "harness.launch", *sweep_jobs.local_overrides(self.sweep, job)]

    def start(self, job: Job) -> None:
        r = self.results[job.index]
        resumed = self.on == "local" and r.status != "pending"  # a chaos job starts over (its bucket is gone)
        folder = self.sweep.job_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / ("chaos.log" if self.on == "chaos" else "launch.log")
        out = open(log, "ab")  # noqa: SIM115 - closed when the job ends
        offset = out.tell()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the launcher adds torchrun's (harness/launch.py)
        proc = subprocess.Popen(self.command(job), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        self.running[job.index] = Running(job, proc, log, offset, out)
        r.status, r.root_cause = ("resumed" if resumed else "running"), None
        r.attempts, r.log = r.attempts + 1, str(log)
        print(f"sweep {self.sweep.name}: job {job.index} {job.run_name} {'resumed' if resumed else 'started'} "
              f"({' '.join(job.swept_overrides) or 'no swept key'}; log {log})", flush=True)
        self.save()

    def ended(self, run: Running, code: int) -> None:
        run.out.close()
        del self.running[run.job.index]
        attempts, exit_codes = self.results[run.job.index].attempts, self.results[run.job.index].exit_codes + [code]
        r = self.observe(run.job.index)
        r.attempts, r.exit_codes, r.log = attempts, exit_codes, str(run.log)
        if r.status != "finished":
            if code == results.PREEMPTED:
                r.status, r.root_cause = "preempted", None
            else:
                text = run.log.read_bytes()[run.offset:].decode(errors="replace")
                r.status = "failed"
                r.root_cause = root_cause(text, code) if code else (r.root_cause or "exited 0 without finishing")
        detail = f": {r.root_cause}" if r.status == "failed" else ""
        print(f"sweep {self.sweep.name}: job {run.job.index} {run.job.run_name} {r.status} (exit {code}){detail}",
              flush=True)
        self.save()

    # ------------------------------------------------------------------ the loop

    def _stop(self, signum: int, _frame: object) -> None:
        if self.stopping is None:
            self.stopping = signal.Signals(signum).name
            print(f"sweep {self.sweep.name}: {self.stopping}: no new job starts; the running ones save and stop",
                  flush=True)
        for run in list(self.running.values()):
            if run.proc.poll() is None:
                try:
                    run.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        with lock(self.sweep.dir):
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._stop)
            todo = []
            for job in self.sweep.jobs:
                r = self.observe(job.index)
                if r.status == "finished":
                    print(f"sweep {self.sweep.name}: job {job.index} {job.run_name} finished before "
                          f"(step {r.final_step}): skipped", flush=True)
                else:
                    todo.append(job)
            self.save()
            width = sweep_jobs.limit(self.sweep.cfg)
            print(f"{self.sweep.describe()}; {len(todo)} to run, {width} at a time ({self.on})", flush=True)
            while (todo and self.stopping is None) or self.running:
                while todo and self.stopping is None and len(self.running) < width:
                    self.start(todo.pop(0))
                for run in list(self.running.values()):
                    if (code := run.proc.poll()) is not None:
                        self.ended(run, code)
                time.sleep(POLL_S)
            path = self.save()
        print(results.render(results.read(path) or {}), flush=True)
        print(f"sweep {self.sweep.name}: {path}", flush=True)
        if self.stopping is not None:
            return results.PREEMPTED
        return 0 if all(r.status == "finished" for r in self.results) else 1


class lock:  # noqa: N801 - used as a context manager, like open()
    """An exclusive flock on `<folder>/.lock`, released when the process exits however it exits."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self) -> lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise SweepLocked(f"sweep {self.path.parent.name!r} is already running (pid {holder}, lock "
                              f"{self.path})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
