"""`make cost-plan` of a sweep: the planner (harness/plan.py) for every job, all-Spot vs hybrid vs
on-demand, and the sweep's total.

    make cost-plan ARGS="train.max_steps=20000,50000 plan.nodes=1,2 sweep.max_concurrent=2"

Each job's column values are harness/plan.py's expected cost and goodput for that job's overrides
(`plan.*` keys can be swept too). The totals: the sum of the jobs' expected costs per mode, and the
sweep's expected wall time with `sweep.max_concurrent` jobs at once (jobs start in index order as
earlier ones finish, each taking its expected wall time; no limit: the longest job).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from rich.table import Table

from harness.config import ConfigError
from harness.plan import HOUR, modes, plan_config, plan_mode
from harness.sweep import jobs as sweep_jobs


def is_sweep(overrides: Sequence[str]) -> bool:
    """Whether the command line has a sweep dimension (or `sweep.*` settings)."""
    own, rest = sweep_jobs.split(overrides)
    return bool(own) or bool(sweep_jobs.expand(rest)[1])


def makespan(walls: Sequence[float], width: int | None) -> float:
    """Wall time of jobs started in order on `width` lanes, each when a lane frees up."""
    lanes = [0.0] * min(width or len(walls), len(walls) or 1)
    for wall in walls:
        heapq.heapreplace(lanes, lanes[0] + wall)
    return max(lanes)


def table(overrides: Sequence[str]) -> Table:
    own, rest = sweep_jobs.split(overrides)
    cfg = sweep_jobs.sweep_config(own)
    batch, dimensions = sweep_jobs.expand(rest)
    plans = []
    for i, job in enumerate(batch):
        try:
            p, prices, max_steps, setting = plan_config(job)
            plans.append((job, max_steps, [plan_mode(p, prices, m, max_steps, setting) for m in modes(p)]))
        except ConfigError as err:
            swept = " ".join(o for o in job if o.partition("=")[0] in dimensions)
            raise ConfigError(f"job {i} ({swept}): {err}") from None
    if len({tuple(mp.mode.name for mp in mps) for _, _, mps in plans}) > 1:
        raise ConfigError("the jobs' planner modes differ (plan.hybrid_on_demand_nodes=0 in some): sweep "
                          "plan.hybrid_on_demand_nodes with plan.nodes so that every job has the same columns")
    names = [mp.mode.name for mp in plans[0][2]]
    out = Table(title=f"sweep of {len(batch)} jobs: expected cost per job and in total "
                      f"(at most {cfg.max_concurrent or len(batch)} at once)",
                caption="each job: harness/plan.py's model for its overrides; wall = expected hours")
    for col in ("#", "overrides", "steps"):
        out.add_column(col, justify="left" if col == "overrides" else "right", no_wrap=col == "overrides")
    for name in names:
        out.add_column(f"{name} $", justify="right")
    out.add_column(f"{names[0]} goodput", justify="right")
    for i, (job, max_steps, mps) in enumerate(plans):
        swept = " ".join(o for o in job if o.partition("=")[0] in dimensions) or "-"
        out.add_row(str(i), swept, f"{max_steps:,}", *[f"{mp.cost:,.2f}" for mp in mps],
                    f"{mps[0].expectation.goodput:.1%}")
    out.add_section()
    totals = [sum(mps[m].cost for _, _, mps in plans) for m in range(len(names))]
    walls = [makespan([mps[m].expectation.wall_s for _, _, mps in plans], cfg.max_concurrent) / HOUR
             for m in range(len(names))]
    out.add_row("", "total ($)", "", *[f"{t:,.2f}" for t in totals], "")
    out.add_row("", "vs on-demand", "", *[f"{t / totals[-1]:.0%}" for t in totals], "")
    out.add_row("", "sweep wall time (h)", "", *[f"{w:,.1f}" for w in walls], "")
    return out
