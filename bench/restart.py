"""Restart time: from the launcher's start to the first completed step after a restore, split by phase.

    python -m bench.restart [--trials 3] [--baseline REV]        (make bench-restart)

As a user meets it: `python -m harness.launch` (what `make train` and a VM's unit run, the default job
and config: torchrun, 2 CPU workers, W&B offline) trains until its first checkpoint is committed, then its
whole process tree is SIGKILLed, as a VM dies. Each trial relaunches it and times, from the launcher's
Popen, the first `step N/` line the restored run prints (`train.log_interval=1`); the tree is killed
again once the ledger holds that start's split (harness/telemetry/breakdown.py: launch, imports,
rendezvous, build, restore, first step), which it writes within `telemetry.ledger_flush_s`.

The baseline is the same measurement of the tree before the restart work (`--baseline`, a git revision,
exported to a temporary directory and run by the same python), trial for trial alternating with this
tree's, so both see the same neighbours on a shared machine. Its ledger has no split; its time comes
from the same `step N/` line. Writes bench/results/restart.json (every trial, the machine, the load) and
prints a table; the target is this tree's median at most half the baseline's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.process_tree import kill_tree
from harness.telemetry.breakdown import breakdown
from harness.telemetry.ledger import read_ledger

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "restart.json"
WORK = REPO / "runs" / "bench-restart"  # the run dirs, the launchers' logs and the baseline's tree
BASELINE_REV = "0dd4b83"  # main before issue 16's restart work: 11-15 s a restart on this machine
TARGET_RATIO = 0.5
STEP_LINE = re.compile(rb"^step (\d+)/")
# The torchrun environment of harness/launch.py, which the baseline's launcher adds as this one does.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Variant:
    """One tree to time: its checkout and its run dir."""

    name: str
    root: Path
    run_dir: Path
    seconds: list[float] = field(default_factory=list)  # Popen -> first step printed, per trial
    splits: list[dict[str, float]] = field(default_factory=list)  # from this tree's ledger

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "harness.launch", f"run.dir={self.run_dir}", "train.max_steps=100000",
                "checkpoint.interval_steps=10", "train.log_interval=1", f"health.port={port}"]

    def env(self) -> dict[str, str]:
        return {**os.environ, **TORCHRUN_ENV, "PYTHONPATH": str(self.root)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """A launcher whose output lines are timestamped as they arrive; killed with everything below it."""

    def __init__(self, v: Variant, log: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(v.command(free_port()), cwd=v.root, env=v.env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.first_step: float | None = None
        self.log = log
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "ab") as out:
            for line in self.proc.stdout:
                if self.first_step is None and STEP_LINE.match(line):
                    self.first_step = time.monotonic() - self.started
                out.write(line)

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{what}: not seen (exit {self.proc.returncode}); see {self.log}")
            time.sleep(0.01)

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()
        self._reader.join(5)


def committed(run_dir: Path) -> bool:
    store = run_dir / "checkpoints"
    return store.is_dir() and any(store.glob("step_*"))


def starts(run_dir: Path) -> list[dict[str, float]]:
    """Each recorded start's split (with its total), oldest first, from the run's ledger."""
    b = breakdown(read_ledger(str(run_dir / "checkpoints" / "ledger")))
    return [{**s.phases, "total": s.total_s} for s in b.startups if s.restored_step is not None]


def trial(v: Variant, logs: Path, with_split: bool) -> None:
    before = len(starts(v.run_dir)) if with_split else 0
    launch = Launch(v, logs / f"{v.name}.log")
    try:
        launch.wait_for(lambda: launch.first_step is not None, 300, "the first step after the restore")
        v.seconds.append(launch.first_step)
        if with_split:  # the ledger is written every telemetry.ledger_flush_s
            launch.wait_for(lambda: len(starts(v.run_dir)) > before, 60, "the start's split in the ledger")
            v.splits.append(starts(v.run_dir)[-1])
    finally:
        launch.kill()


def checkpointed(v: Variant, logs: Path) -> None:
    """Train until the first checkpoint is committed, then die as a VM does."""
    shutil.rmtree(v.run_dir, ignore_errors=True)
    launch = Launch(v, logs / f"{v.name}.log")
    try:
        launch.wait_for(lambda: committed(v.run_dir), 600, "a committed checkpoint")
    finally:
        launch.kill()


def export(rev: str, into: Path) -> Path:
    """The tree of `rev` (git archive), to run as it was."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "platform": platform.platform()}


def summarize(v: Variant) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": [round(s, 3) for s in v.seconds],
                           "median_s": round(statistics.median(v.seconds), 3), "best_s": round(min(v.seconds), 3)}
    if v.splits:
        out["splits"] = [{k: round(s, 3) for k, s in split.items()} for split in v.splits]
        out["median_split_s"] = {k: round(statistics.median(s[k] for s in v.splits if k in s), 3)
                                 for k in v.splits[0]}
    return out


def print_table(result: dict[str, Any]) -> None:
    ours, base = result["this_tree"], result["baseline"]
    print(f"\nrestart: launcher start -> first step after the restore, {result['trials']} trials each "
          f"(load {result['load_before']} -> {result['load_after']})")
    print(f"  {'':16} {'median':>8} {'best':>8}   trials")
    for name, r in (("baseline " + result["baseline_rev"], base), ("this tree", ours)):
        print(f"  {name:16} {r['median_s']:7.2f}s {r['best_s']:7.2f}s   " + " ".join(f"{s:.2f}" for s in r["seconds"]))
    if "median_split_s" in ours:
        print("  this tree's split (median of trials, seconds): "
              + ", ".join(f"{k.replace('_', ' ')} {s:.2f}" for k, s in ours["median_split_s"].items()))
    verdict = "met" if result["ratio_median"] <= TARGET_RATIO else "MISSED"
    print(f"  ratio this tree / baseline: median {result['ratio_median']:.2f}, best {result['ratio_best']:.2f} "
          f"(target <= {TARGET_RATIO}: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare with")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shutil.rmtree(WORK, ignore_errors=True)
    base = Variant("baseline", export(args.baseline, WORK / "baseline-tree"), WORK / "baseline-run")
    ours = Variant("this_tree", REPO, WORK / "this-tree-run")
    load_before = os.getloadavg()[0]
    for v in (base, ours):
        checkpointed(v, WORK)
    for i in range(args.trials):
        for v in (base, ours):
            trial(v, WORK, with_split=v is ours)
            print(f"trial {i + 1}/{args.trials} {v.name}: {v.seconds[-1]:.2f}s", flush=True)
    result = {
        "what": "seconds from `python -m harness.launch` (default job, W&B offline) being started to the "
                "first step printed after it restored the checkpoint of a SIGKILLed run; the split is "
                "this tree's ledger's (harness/telemetry/breakdown.py PHASES, launch from the launcher's start)",
        "baseline_rev": args.baseline, "trials": args.trials, "target_ratio": TARGET_RATIO,
        "baseline": summarize(base), "this_tree": summarize(ours),
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "machine": machine(),
    }
    result["ratio_median"] = round(result["this_tree"]["median_s"] / result["baseline"]["median_s"], 3)
    result["ratio_best"] = round(result["this_tree"]["best_s"] / result["baseline"]["best_s"], 3)
    result["target_met"] = result["ratio_median"] <= TARGET_RATIO
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
