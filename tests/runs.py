"""Real training processes for tests: launch `harness.train` alone or under torchrun, wait for
on-disk events, kill whole process trees the way a VM dies, read results back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.config import LaunchConfig
from harness.launch import FORKED, TORCHRUN_ENV, fork_workers
from harness.process_tree import descendants, kill_tree

REPO = Path(__file__).resolve().parent.parent

# Small and fast, but with enough state that a checkpoint write takes measurable time.
# W&B offline starts a service process per run (~8 s here): only the tests of W&B turn it back on.
FAST = ["health.enabled=false", "train.log_interval=5", "wandb.mode=disabled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, **TORCHRUN_ENV, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    e.update(extra)
    return e


def train_cmd(nproc: int, overrides: list[str], max_restarts: int = 0) -> list[str]:
    """nproc=0: one plain process; else torchrun starting its workers as the launcher has it start them
    here with the default launch.workers (auto: forked from the agent on a node without GPUs, harness/launch.py)."""
    if nproc == 0:
        return [sys.executable, "-m", "harness.train", *FAST, *overrides]
    start = ["--start-method=fork", "--run-path", str(FORKED)] if fork_workers(LaunchConfig().workers) else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", *start, "-m", "harness.train", *FAST, *overrides]


def start(nproc: int, overrides: list[str], log: Path, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    """nproc=0 runs one plain process; n >= 1 runs torchrun with n workers."""
    out = open(log, "ab")
    return subprocess.Popen(train_cmd(nproc, overrides, **kw), cwd=REPO, env=env(**(extra_env or {})), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(nproc: int, overrides: list[str], log: Path, timeout: float = 240, **kw) -> int:
    seen = log.stat().st_size if log.exists() else 0
    code = finish(start(nproc, overrides, log, **kw), log, timeout)
    if code and lost_port_race(log.read_bytes()[seen:].decode(errors="replace")):
        code = finish(start(nproc, overrides, log, **kw), log, timeout)
    return code


def lost_port_race(output: str) -> bool:
    """torchrun's agent picks its workers' store port by binding port 0 and closing the socket; rank 0
    binds that port again a moment later (torch's get_free_port says it is not reserved). Here many jobs
    open sockets in the same range at once, and one launch in a few hundred loses the port in between
    (EADDRINUSE in rank 0's store, before any step). A VM runs one job, and its unit restarts a failed
    launcher; a test starts such a run once more (nothing was trained or saved)."""
    return "EADDRINUSE" in output and "_create_c10d_store" in output


def torchrun_script(nproc: int, script: Path | str, args: list[str],
                    timeout: float = 180) -> subprocess.CompletedProcess:
    """A test's own script under torchrun (standalone, `nproc` workers), its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode and lost_port_race(proc.stdout + proc.stderr):
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """Wait for a started run; on timeout kill its whole tree and fail with the log's tail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"run timed out after {timeout}s; log:\n{tail(log)}") from None


def worker_pids(agent_pid: int) -> list[int]:
    return [p for p in descendants(agent_pid) if "harness.train" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(predicate, timeout: float = 120, interval: float = 0.002, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def committed(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("step_*")) if store.is_dir() else []


def in_progress(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob(".tmp-step_*")) if store.is_dir() else []


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def consumed_samples(run_dir: Path) -> list[int]:
    """Every global sample index the run's steps trained on, sorted, from its audit (train.audit_samples:
    `step first stop` per step, a file per process)."""
    consumed = []
    for record in (run_dir / "samples").glob("*.txt"):
        for line in record.read_text().splitlines():
            _step, first, stop = map(int, line.split())
            consumed.extend(range(first, stop))
    return sorted(consumed)


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def launcher_cmd(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "harness.launch", f"launch.nproc_per_node={nproc}", *FAST, *overrides]


def start_launcher(nproc: int, overrides: list[str], log: Path, extra_env: dict | None = None,
                   new_session: bool = True) -> subprocess.Popen:
    """`python -m harness.launch` as `make train` runs it (torchrun underneath)."""
    out = open(log, "ab")
    return subprocess.Popen(launcher_cmd(nproc, overrides), cwd=REPO, env=env(**(extra_env or {})), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=new_session)


def training_workers(root_pid: int) -> list[int]:
    """PIDs of the `harness.train` worker processes below a launcher or torchrun agent."""
    return sorted(p for p in descendants(root_pid)
                  if "harness.train" in _cmdline(p) and "torch.distributed.run" not in _cmdline(p))


def logged_step(log: Path, step: int) -> bool:
    return log.exists() and f"step {step}/" in log.read_text(errors="replace")


def run_launcher(nproc: int, overrides: list[str], log: Path, timeout: float = 240, **kw) -> int:
    return finish(start_launcher(nproc, overrides, log, **kw), log, timeout)
