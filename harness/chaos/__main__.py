"""`python -m harness.chaos [overrides]` (`make chaos`): run a training job on the local Spot cloud.

Overrides starting with `chaos.` configure the cloud (conf/chaos/default.yaml); every other override is
the training job's, appended to `chaos.job` and carried to each VM in its metadata. Prints where the
report and the timeline are; exits 0 when the job finished, 1 when it did not, 2 on a bad config.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from harness import config
from harness.chaos import report, schedule
from harness.chaos.cloud import Cloud
from harness.chaos.reference import Reference


def is_chaos_key(override: str) -> bool:
    return override.lstrip("+~").startswith("chaos.")


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """Unwind through the cloud's cleanup (no simulated VM is left running); a second signal, as from a
    process-group kill, must not interrupt that cleanup."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    overrides = sys.argv[1:] if argv is None else argv
    own = [o for o in overrides if is_chaos_key(o)]
    try:
        chaos = config.load(own).chaos
        job = [*chaos.job, *(o for o in overrides if not is_chaos_key(o))]
        cfg = config.load([*job, *own])  # the job as every VM will compose it: fail here, not on the VMs
        plan = schedule.build(cfg.chaos)
    except (config.ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    chaos = cfg.chaos
    out = Path(chaos.out_dir).resolve()
    for stale in ("vms", "logs", "gcs", "chaos_report.json", "chaos_timeline.png", "ledger.jsonl"):
        path = out / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    world = int(chaos.topology.workers) * int(chaos.topology.nproc_per_worker)
    ref = Reference(list(job), world, out.parent / "references", float(chaos.max_duration_s))
    if chaos.reference:
        ref.start()
    print(f"chaos: {chaos.topology.workers} Spot workers x {chaos.topology.nproc_per_worker} procs + coordinator, "
          f"trainer {chaos.trainer}, {len(plan)} preemptions planned (mtbi_s={chaos.mtbi_s} per VM, "
          f"seed {chaos.seed}, notice {chaos.notice_s}s, recreate {chaos.recreate_s}s)", flush=True)
    try:
        outcome = Cloud(cfg, out, list(job), plan).run()
        reference_sha = ref.model_sha256() if chaos.reference else None
    finally:
        ref.stop()
    result = report.build(outcome, chaos, reference_sha)
    json_path, png_path = report.write(result, outcome, out)
    ledger = result["ledger"]["goodput"] if result["ledger"] else None
    print(f"chaos: finished={result['finished']} goodput: ledger {'-' if ledger is None else f'{ledger:.3f}'}, "
          f"observer {result['observer']['goodput']:.3f}; preemptions={result['preemptions']} "
          f"recreates={result['recreates']} "
          f"lost_steps={result['lost_steps']} exact={result['exact']}\n"
          f"  report:   {json_path}\n  timeline: {png_path}\n  VM logs:  {outcome.logs}", flush=True)
    return 0 if outcome.finished else 1


if __name__ == "__main__":
    sys.exit(main())
