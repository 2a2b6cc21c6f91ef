"""`python -m harness.sweep [overrides]` (make sweep): run a Hydra multirun as jobs on this machine.
`python -m harness.sweep --status [overrides]` (make sweep-status): the same table from the jobs'
durable tiers (for `sweep.on=gcp`, the deployment's bucket), written to sweep.json too.

    make sweep ARGS="optim.lr=1e-3,3e-4 model.n_layer=2,4"
    make sweep ARGS="optim.lr=1e-3,3e-4 sweep.on=chaos sweep.parallel=2"
    make sweep-status ARGS="sweep.on=gcp infra.project=my-proj optim.lr=1e-3,3e-4"

Give the same overrides to re-run (finished jobs are skipped, the others resume) or to ask for the
status. Exit codes: 0 every job finished (`--status`: always, once the table is printed), 1 some job
did not, 2 a bad override (nothing started), 75 the sweep was stopped (SIGTERM/SIGINT): run it again
to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.config import ConfigError
from harness.sweep import jobs as sweep_jobs
from harness.sweep import results
from harness.sweep.jobs import Sweep
from harness.sweep.runner import Runner, SweepLocked, initial_results, observe


def status(sweep: Sweep) -> dict:
    """Every job's state from its durable tier (or the local Spot cloud's report), as sweep.json holds it."""
    rows = [observe(sweep, r) for r in initial_results(sweep, sweep_jobs.check(sweep))]
    doc = results.document(sweep, rows)
    results.write(sweep.dir / results.FILE, doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides and sweeps, e.g. optim.lr=1e-3,3e-4")
    parser.add_argument("--status", action="store_true", help="print the table from the jobs' durable tiers")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sweep = sweep_jobs.build(args.overrides)
        if args.status:
            given = any(sweep_jobs.key_of(o) == "sweep.on" for o in args.overrides)
            earlier = results.read(sweep.dir / results.FILE)
            if not given and earlier and earlier.get("on") in sweep_jobs.PLACES and earlier["on"] != sweep.cfg.on:
                sweep = sweep_jobs.build([*args.overrides, f"sweep.on={earlier['on']}"])
            doc = status(sweep)
            print(results.render(doc))
            print(f"sweep {sweep.name}: {sweep.dir / results.FILE}")
            return 0
        if sweep.cfg.on == "gcp":
            raise ConfigError("sweep.on=gcp: a sweep on Google Cloud is deployed, not run here: `make deploy "
                              "ARGS=\"--multirun ...\"`, then `make sweep-status ARGS=\"...\"` for its table")
        composed = sweep_jobs.check(sweep)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        return Runner(sweep, composed).run()
    except SweepLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
