"""Where a job's time went, from its ledger: `python -m harness.goodput <run dir or gs:// location>`.

The location may be the ledger itself, a checkpoint store holding `ledger/`, or a run directory
holding `checkpoints/ledger/`. Prints the goodput breakdown (and the cost, when the job recorded its
prices) and writes a PNG timeline: `<run dir>/goodput_timeline.png` for a local run, else
`./goodput_timeline.png`, or `--out`. A job that has not finished is counted up to now: while no
process of it runs, its downtime grows and its goodput falls.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.cost import CostModel
from harness.telemetry.goodput import CATEGORIES, PRODUCTIVE, Breakdown, breakdown
from harness.telemetry.ledger import ledger_location, read_ledger
from harness.telemetry.timeline import plot_timeline


def find_ledger(location: str) -> tuple[str, list[dict[str, Any]]]:
    """The first of `location`, `<location>/ledger`, `<location>/checkpoints/ledger` holding events."""
    base = location.rstrip("/")
    tried = [base, ledger_location(base), ledger_location(f"{base}/checkpoints")]
    for candidate in tried:
        events = read_ledger(candidate)
        if events:
            return candidate, events
    raise FileNotFoundError(f"no ledger events in any of: {', '.join(tried)}")


def _hms(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{seconds % 60:04.1f}"


def report(b: Breakdown) -> Table:
    until = "to the job's end" if b.finished else "to now"
    out = Table(title=f"goodput {b.goodput:.1%} of {_hms(b.total_s)} (h:mm:ss) wall time, {until}")
    out.add_column("category")
    out.add_column("time", justify="right")
    out.add_column("share", justify="right")
    for c in CATEGORIES:
        out.add_row(c, _hms(b.seconds[c]), f"{b.seconds[c] / b.total_s:.1%}" if b.total_s else "-")
    out.add_section()
    facts = {
        "preemptions": b.preemptions, "restarts": b.restarts,
        "world sizes": ", ".join(map(str, b.world_sizes)) or "-", "last step": b.last_step,
        "productive steps": b.productive_steps, "recomputed steps": b.lost_steps,
        "telemetry errors": b.telemetry_errors,
    }
    info = b.job_info
    if "hourly_usd" in info:
        cost = CostModel(info["hourly_usd"], info["on_demand_hourly_usd"], info.get("price_source", ""),
                         info.get("price_as_of", ""))
        for key, value in cost.metrics(b.running_s, b.seconds[PRODUCTIVE], b.productive_steps).items():
            facts[key.removesuffix("_usd").replace("_", " ") + " ($)"] = f"{value:,.4f}"
        if cost.as_of:
            facts["prices as of"] = cost.as_of
    for key, value in facts.items():
        out.add_row(key, str(value), "")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.goodput", description=__doc__.split("\n")[0])
    parser.add_argument("location", help="run dir, checkpoint store or ledger: a path or gs://bucket/prefix")
    parser.add_argument("--out", type=Path, help="where to write the PNG timeline")
    args = parser.parse_args(argv)
    console = Console()
    try:
        where, events = find_ledger(args.location)
    except FileNotFoundError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    b = breakdown(events, now=time.time())
    console.print(f"ledger: {where} ({len(events)} events, {len(b.lives)} process incarnations)")
    console.print(report(b))
    default_dir = Path(".") if args.location.startswith("gs://") else Path(args.location)
    path = plot_timeline(b, args.out or default_dir / "goodput_timeline.png")
    console.print(f"timeline written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
