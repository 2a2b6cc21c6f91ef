"""Goodput under preemptions: the guides' trainer, this harness, and the Young/Daly optimum, on one schedule.

    python -m bench.goodput [--sequential] [overrides]        (make bench-goodput)

(a) baseline  `harness.chaos.baseline` on the local Spot cloud: synchronous torch.save from rank 0 to the
              local SSD every `chaos.baseline.interval_steps`, every `gcs_every`-th save uploaded, no
              emergency save, restart from a surviving local file else from the bucket.
(b) harness   `harness.train` on the same cloud, job and seeded preemption schedule, twice:
              `elastic.on_preemption=wait` (the default: the job waits for the recreated VM and stays
              bit-exact) and `shrink` (the survivors train on, the job grows back when the VM returns).
(c) Young/Daly the analytical optimum of periodic checkpointing without a notice: durable checkpoints
              every sqrt(2 C M) seconds, C = the baseline's measured durable save (torch.save + upload),
              restart cost = the baseline's measured restart gaps, t = the measured step time. Given
              twice: replayed on the same preemption times, and in expectation for Poisson
              interruptions at the nominal MTBI (harness.plan's model).
The three clouds run side by side (the paced job leaves the CPU mostly idle; --sequential runs them one
after the other). Goodput is the chaos observer's for both (the same definition; the baseline keeps no
ledger): steps kept x step time / wall time from the first VM boot to the job's summary.
Writes bench/results/goodput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness.cadence import young_daly_interval_s
from harness.plan import Mode, PlanConfig, expected, interruption_rate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "goodput.json"
OUT = REPO / "runs" / "bench-goodput"

# The schedule and job of the comparison, on a compressed clock: 1 s here stands for about 24 s on GCP.
# A Spot A100 VM's MTBI of 6 h (guide 001: 4-8 h) -> 900 s per VM; the guides' cadence "local SSD every
# 10 min, GCS every 2 h" -> a local save every 230 steps (~25-30 s), every 12th also uploaded. The 30 s
# notice is not compressed as much (8 s): processes here start no faster than on a VM. A Spot GPU VM
# takes a few minutes to come back (the MIG's recreate, boot, GPU driver, release install: 2-4 min,
# guide 001's measurements and the DLVM boot times in ../shared/reference/) -> 7 s here, the middle of
# the 5-10 s that 2-4 min compress to at 24x. Seed 191 preempts worker-0 (global rank 0) 154 s after the
# first step, and nothing else for 910 s: one preemption in a run of ~4 compressed hours, the most likely
# count at a 6 h MTBI per VM.
SETTINGS = [
    "topology=all_spot",  # 2 Spot workers (harness/chaos/conf/chaos.yaml's job) + the coordinator
    "chaos.mtbi_s=900", "chaos.seed=191", "chaos.notice_s=8", "chaos.recreate_s=7", "chaos.max_duration_s=1500",
    "chaos.baseline.interval_steps=230", "chaos.baseline.gcs_every=12", "telemetry.ledger_flush_s=1",
    "model.pace_s=0.1", "model.n_layer=2", "model.n_embd=64", "train.max_steps=4200", "train.log_interval=500",
]
# name -> (trainer, the run's own overrides); shrink may go on with one worker of the two.
RUNS = {"baseline": ("harness.chaos.baseline", []), "harness": ("harness.train", []),
        "shrink": ("harness.train", ["elastic.on_preemption=shrink", "topology.workers.min=1"])}
SAVE = re.compile(r"baseline: (save|upload) step (\d+) (?:local|gcs) ([\d.]+)s")
RESTORE = re.compile(r"baseline: restore step (\d+) from (local|gcs) ([\d.]+)s")


def chaos_command(name: str, module: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "harness.chaos", *overrides, f"chaos.name=goodput-{name}",
            f"chaos.out_dir={OUT / name}", f"chaos.trainer={module}",
            f"chaos.reference={'true' if name == 'harness' else 'false'}"]


def setting(overrides: list[str], key: str) -> str:
    """The value the last override gives `key` (what the run used)."""
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "=")), "?")


def run_all(overrides: list[str], sequential: bool) -> dict[str, dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, (module, own) in RUNS.items():
        log = open(OUT / f"{name}.log", "w")  # noqa: SIM115 - held by the child until it exits
        print(f"bench: {name} on the local Spot cloud (log {OUT / name}.log)", flush=True)
        procs[name] = subprocess.Popen(chaos_command(name, module, [*overrides, *own]), cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT)
        if sequential:
            procs[name].wait()
    reports = {}
    for name, proc in procs.items():
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: each cloud deletes its VMs on SIGTERM
            for other in procs.values():
                other.terminate()
            raise
        path = OUT / name / "chaos_report.json"
        if code != 0 or not path.is_file():
            tail = (OUT / f"{name}.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"bench: the {name} run failed (exit {code}); its log ends:\n{tail}")
        reports[name] = json.loads(path.read_text())
    return reports


def baseline_costs(report: dict) -> dict[str, float]:
    """The baseline's own timings, from its journal: local save, upload, restore."""
    text = "".join(p.read_text(errors="replace") for p in Path(report["logs"]).rglob("spot-train.service.log"))
    saves: dict[str, list[float]] = {"save": [], "upload": []}
    for kind, _step, seconds in SAVE.findall(text):
        saves[kind].append(float(seconds))
    restores = [(src, float(s)) for _step, src, s in RESTORE.findall(text)]
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0  # noqa: E731
    return {"local_save_s": mean(saves["save"]), "upload_s": mean(saves["upload"]),
            "durable_save_s": mean(saves["save"]) + mean(saves["upload"]),
            "restore_s": mean([s for _, s in restores]), "restores": [src for src, _ in restores],
            "saves": len(saves["save"]), "uploads": len(saves["upload"])}


def replay(step_s: float, c: float, interval: int, steps: int, restart_s: float, arrivals: list[tuple[float, int]],
           startup_s: float) -> dict[str, float]:
    """Periodic durable checkpoints every `interval` steps, no notice, on these preemption times (seconds
    after the first step, VM): an interruption loses the work since the last checkpoint and costs
    restart_s; a preemption due while its VM is down is skipped, one of another VM extends the restart."""
    now, done, lost, hits = 0.0, 0, 0, 0
    pending = sorted(arrivals)
    down: tuple[float, int] | None = None
    while done < steps:
        target = min(steps, (done // interval + 1) * interval)
        segment = (target - done) * step_s + c
        while pending and pending[0][0] < now:
            pending.pop(0)
        if not pending or pending[0][0] >= now + segment:
            now, done = now + segment, target
            continue
        at, vm = pending.pop(0)
        hits += 1
        lost += int((at - now) / step_s)
        now, down = at + restart_s, (at + restart_s, vm)
        while pending and pending[0][0] < now:
            at, vm = pending.pop(0)
            if vm != down[1]:
                hits += 1
                now = at + restart_s
    wall = startup_s + now
    return {"goodput": steps * step_s / wall, "wall_s": wall, "preemptions": hits, "lost_steps": lost}


def young_daly(reports: dict[str, dict], costs: dict[str, float], emergency_s: list[float]) -> dict:
    """The optimum without a notice, on the harness's own run: its step time, startup and restarts
    (less the emergency save it would not make), with durable checkpoints of the baseline's measured
    cost every sqrt(2 C M) instead of the harness's saves."""
    ours = reports["harness"]
    obs = ours["observer"]
    step_s, steps = obs["step_s"], ours["final_step"]
    workers, mtbi_vm = ours["topology"]["spot_workers"], ours["schedule"]["mtbi_s_per_vm"]
    gaps = obs["restart_gaps_s"] or reports["baseline"]["observer"]["restart_gaps_s"]
    emergency = statistics.fmean(emergency_s) if emergency_s else 0.0
    restart_s = max(0.0, statistics.fmean(gaps) - emergency) if gaps else 0.0
    c = max(costs["durable_save_s"], 1e-3)
    system_mtbi = mtbi_vm / workers
    tau_s = young_daly_interval_s(c, system_mtbi)
    interval = max(1, round(tau_s / step_s))
    arrivals = [(p["at_s"], p["vm"]) for p in ours["schedule"]["planned"]]
    same_schedule = replay(step_s, c, interval, steps, restart_s, arrivals, obs["seconds"]["startup"])
    plan = PlanConfig(step_time_s=step_s, checkpoint_cost_s=c, restore_s=costs["restore_s"],
                      restart_s=max(0.0, restart_s - costs["restore_s"]), emergency_save_s=0.0,
                      notice_s=ours["schedule"]["notice_s"], mtbi_spot_h=mtbi_vm / 3600, nodes=workers,
                      hybrid_on_demand_nodes=0, simulate_runs=0)
    poisson = expected(plan, steps, interval, interruption_rate(plan, Mode("all-Spot", workers, 0)))
    return {"step_s": step_s, "checkpoint_cost_s": c, "restart_s": restart_s, "startup_s": obs["seconds"]["startup"],
            "system_mtbi_s": system_mtbi, "interval_s": tau_s, "interval_steps": interval,
            "same_schedule": same_schedule,
            "poisson_expectation": {"goodput": poisson.goodput, "wall_s": poisson.wall_s,
                                    "interruptions": poisson.interruptions}}


def row(report: dict) -> dict:
    obs = report["observer"]
    return {"goodput": obs["goodput"], "wall_s": obs["total_s"], "preemptions": report["preemptions"],
            "recreates": report["recreates"], "lost_steps": report["lost_steps"], "exact": report["exact"],
            "step_s": obs["step_s"], "seconds": obs["seconds"], "restart_gaps_s": obs["restart_gaps_s"],
            "ledger_goodput": (report.get("ledger") or {}).get("goodput")}


def emergency_saves(report: dict) -> list[float]:
    """Seconds of each emergency save (rank 0's journal lines `preempted: step N saved to T in Xs`)."""
    text = "".join(p.read_text(errors="replace") for p in Path(report["logs"]).rglob("spot-train.service.log"))
    return [float(s) for s in re.findall(r"preempted: step \d+ saved to \S+ in ([\d.]+)s", text)]


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", action="store_true", help="run the clouds one after the other")
    args, overrides = parser.parse_known_args()
    overrides = [*SETTINGS, *overrides]
    started = time.time()
    reports = run_all(overrides, args.sequential)
    costs = baseline_costs(reports["baseline"])
    ours = reports["harness"]
    saves = emergency_saves(ours)
    yd = young_daly(reports, costs, saves)
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "bench_wall_s": round(time.time() - started, 1),
        "overrides": overrides,
        "schedule": ours["schedule"],
        "baseline": {**row(reports["baseline"]), "costs": costs},
        "harness": {**row(ours), "emergency_saves_s": saves,
                    "lost_nothing_when_notice_outlasts_save": ours["lost_steps"] == 0
                    and all(s < ours["schedule"]["notice_s"] for s in saves)},
        "shrink": {**row(reports["shrink"]), "world_sizes": reports["shrink"]["world_sizes"],
                   "repeated_samples": reports["shrink"]["repeated_samples"]},
        "young_daly": yd,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"bench: wrote {RESULTS} ({result['bench_wall_s']:.0f}s); reports and timelines under {OUT}")
    return 0


def print_table(r: dict) -> None:
    yd = r["young_daly"]
    lines = [
        "| | goodput | preemptions | lost steps | checkpoint interval | wall (s) |",
        "|---|---|---|---|---|---|",
        _line("(a) guides' baseline", r["baseline"],
              f"{setting(r['overrides'], 'chaos.baseline.interval_steps')} steps, every "
              f"{setting(r['overrides'], 'chaos.baseline.gcs_every')}th to GCS"),
        _line("(b) this harness, on_preemption=wait", r["harness"], "50 steps (async) + emergency save"),
        _line("(b) this harness, on_preemption=shrink", r["shrink"], "50 steps (async) + emergency save"),
        f"| (c) Young/Daly, same schedule | {yd['same_schedule']['goodput']:.3f} | "
        f"{yd['same_schedule']['preemptions']} | {yd['same_schedule']['lost_steps']} | "
        f"{yd['interval_steps']} steps ({yd['interval_s']:.1f} s) | {yd['same_schedule']['wall_s']:.0f} |",
        f"| (c) Young/Daly, Poisson expectation | {yd['poisson_expectation']['goodput']:.3f} | "
        f"{yd['poisson_expectation']['interruptions']:.2f} | - | {yd['interval_steps']} steps | "
        f"{yd['poisson_expectation']['wall_s']:.0f} |",
    ]
    print("\n".join(lines))


def _line(name: str, run: dict, interval: str) -> str:
    return (f"| {name} | {run['goodput']:.3f} | {run['preemptions']} | {run['lost_steps']} | {interval} | "
            f"{run['wall_s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
