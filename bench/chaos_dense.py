"""Dense preemption schedules on the local Spot cloud: does the job always finish, exact, and rejoin?

    python -m bench.chaos_dense [--seeds 0 1 2 3 4] [overrides]        (make bench-chaos-dense)

`make chaos` with `chaos.mtbi_s=20` per Spot VM (the default topology, hybrid: a preemption about
every 10 s across the two workers, so pairs preempted within 2 s of each other and VMs preempted again
while they wait in rendezvous come up on their own) over several seeds, one after the other. Every
run must end `finished` and `exact`; one that does not is reported with the cloud's last events, so
the JSON says precisely why. Writes bench/results/chaos_dense.json and prints a table. (The suite runs
one short dense case with an explicit schedule: tests/chaos/test_chaos.py, all_spot.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "chaos_dense.json"
OUT = REPO / "runs" / "bench-chaos-dense"
SETTINGS = ["chaos.mtbi_s=20", "chaos.max_duration_s=480", "train.max_steps=600"]
CLOSE_S = 2.0  # two preemptions of different VMs this close count as "together"


def close_pairs(events: list[dict]) -> int:
    preempts = [e for e in events if e["kind"] == "preempt"]
    return sum(1 for a, b in zip(preempts, preempts[1:], strict=False)
               if a["vm"] != b["vm"] and b["t_s"] - a["t_s"] <= CLOSE_S)


def again_before_training(events: list[dict]) -> int:
    """Preemptions of a recreated VM before the job took a step after its return (it was still booting
    or in rendezvous): the case that once closed the rendezvous for good."""
    count, returned = 0, {}
    for e in events:
        if e["kind"] == "recreate":
            returned[e["vm"]] = e["t_s"]
        elif e["kind"] == "preempt" and e["vm"] in returned:
            count += e["t_s"] - returned.pop(e["vm"]) < 20.0
    return count


def run_seed(seed: int, overrides: list[str]) -> dict:
    out = OUT / f"seed-{seed}"
    cmd = [sys.executable, "-m", "harness.chaos", *SETTINGS, *overrides, f"chaos.seed={seed}",
           f"chaos.name=dense-{seed}", f"chaos.out_dir={out}"]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (OUT / f"seed-{seed}.log").write_text(proc.stdout + proc.stderr)
    path = out / "chaos_report.json"
    if not path.is_file():
        return {"seed": seed, "finished": False, "exact": None, "why": f"no report (exit {proc.returncode}): "
                + (proc.stdout + proc.stderr)[-1500:]}
    r = json.loads(path.read_text())
    row = {"seed": seed, "finished": r["finished"], "exact": r["exact"], "final_step": r["final_step"],
           "preemptions": r["preemptions"], "missed_preemptions": r["missed_preemptions"],
           "recreates": r["recreates"], "autoheals": r.get("autoheals", 0), "lost_steps": r["lost_steps"],
           "close_pairs": close_pairs(r["events"]), "preempted_again_before_training":
           again_before_training(r["events"]), "goodput_ledger": (r["ledger"] or {}).get("goodput"),
           "goodput_observer": r["observer"]["goodput"], "wall_s": round(time.time() - started, 1),
           "unit_exits": {vm["name"]: vm["unit_exits"] for vm in r["vms"]}}
    if not (r["finished"] and r["exact"]):
        row["why"] = [f"{e['t_s']:.1f}s {e['vm']} {e['kind']} {e['detail']}" for e in r["events"][-12:]]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args, overrides = parser.parse_known_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        print(f"bench: seed {seed} (log {OUT}/seed-{seed}.log)", flush=True)
        rows.append(run_seed(seed, overrides))
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": [*SETTINGS, *overrides], "runs": rows,
              "all_finished_exact": all(r["finished"] and r["exact"] for r in rows)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| seed | finished | exact | preemptions | together (<2 s) | again before training | lost steps | "
          "goodput (ledger / observer) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        gl = "-" if r.get("goodput_ledger") is None else f"{r['goodput_ledger']:.3f}"
        print(f"| {r['seed']} | {r['finished']} | {r['exact']} | {r.get('preemptions', '-')} | "
              f"{r.get('close_pairs', '-')} | {r.get('preempted_again_before_training', '-')} | "
              f"{r.get('lost_steps', '-')} | {gl} / {r.get('goodput_observer', 0):.3f} |")
    print(f"bench: wrote {RESULTS}")
    return 0 if result["all_finished_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
