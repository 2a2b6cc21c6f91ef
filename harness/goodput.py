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

from harness.telemetry.breakdown import breakdown
from harness.telemetry.ledger import ledger_location, read_ledger
from harness.telemetry.table import goodput_table
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
    console.print(goodput_table(b))
    default_dir = Path(".") if args.location.startswith("gs://") else Path(args.location)
    path = plot_timeline(b, args.out or default_dir / "goodput_timeline.png")
    console.print(f"timeline written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
