"""The goodput breakdown as a table (rich), for the trainer's end of run and `make goodput`."""

from __future__ import annotations

from rich.table import Table

from harness.cost import CostModel
from harness.telemetry.breakdown import CATEGORIES, PRODUCTIVE, STARTUP, Breakdown, Startup


def _hms(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{seconds % 60:04.1f}"


def _split_rows(out: Table, s: Startup) -> None:
    """Under the startup row: the latest start, launch to first completed step, phase by phase (share:
    of that start), since what a restart costs is what a preemption costs besides the lost work."""
    origin = f"from step {s.restored_step}" if s.restored_step is not None else "from scratch"
    out.add_row(f"  latest start ({origin})", f"{s.total_s:.2f} s", "")
    for phase, seconds in s.phases.items():
        out.add_row(f"    {phase.replace('_', ' ')}", f"{seconds:.2f} s",
                    f"{seconds / s.total_s:.0%}" if s.total_s > 0 else "-")


def goodput_table(b: Breakdown) -> Table:
    until = "to the job's end" if b.finished else "to now"
    out = Table(title=f"goodput {b.goodput:.1%} of {_hms(b.total_s)} (h:mm:ss) wall time, {until}")
    out.add_column("category")
    out.add_column("time", justify="right")
    out.add_column("share", justify="right")
    for c in CATEGORIES:
        out.add_row(c, _hms(b.seconds[c]), f"{b.seconds[c] / b.total_s:.1%}" if b.total_s else "-")
        if c == STARTUP and b.startups:
            _split_rows(out, b.startups[-1])
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
