"""What each topology costs per hour at the configured prices (`cost.*`), for `make cost-per-hour`
and the README. Node prices come from harness/cost.py, so the job's cost-so-far and this table agree.
Compute only: disks, network egress and bucket storage are not included."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.cost import node_hourly
from infra.settings import NodeSettings, Settings


@dataclass(frozen=True)
class HourlyCost:
    topology: str
    master: float  # USD/h of the master (always on-demand)
    worker: float  # USD/h of one worker, as provisioned
    workers_min: int
    workers_max: int
    on_demand_equivalent: float  # USD/h of the same training nodes (at workers_max), all on-demand
    as_of: str

    @property
    def at_max(self) -> float:
        return self.master + self.workers_max * self.worker

    @property
    def at_min(self) -> float:
        return self.master + self.workers_min * self.worker


def hourly_cost(settings: Settings, cost_cfg: Mapping[str, Any] | None = None) -> HourlyCost:
    """USD per hour of the topology in `settings` at the prices in `cost_cfg` (default: its `cost` group)."""
    cost = settings.cost if cost_cfg is None else cost_cfg
    m, w = settings.topology.master, settings.topology.workers
    provisioning = "spot" if w.provisioning == "SPOT" else "on_demand"
    master = node_hourly(cost, m.machine_type, m.gpu_type, m.gpu_count, "on_demand")
    worker = node_hourly(cost, w.machine_type, w.gpu_type, w.gpu_count, provisioning)
    worker_on_demand = node_hourly(cost, w.machine_type, w.gpu_type, w.gpu_count, "on_demand")
    return HourlyCost(
        topology=settings.topology.name, master=master, worker=worker,
        workers_min=w.min, workers_max=w.max,
        on_demand_equivalent=(master if settings.master_trains else 0.0) + w.max * worker_on_demand,
        as_of=str(cost.get("as_of", "")),
    )


def _node(n: NodeSettings) -> str:
    return n.machine_type + (f" + {n.gpu_count}x {n.gpu_type}" if n.gpu_count else "")


def _describe(settings: Settings) -> tuple[str, str]:
    """(master, workers) in words, e.g. ('on-demand a2-highgpu-1g + 1x nvidia-tesla-a100 (trainer)', ...)."""
    m, w = settings.topology.master, settings.topology.workers
    kind = "Spot" if w.provisioning == "SPOT" else "on-demand"
    return (f"on-demand {_node(m)} ({m.role})", f"{w.min}-{w.max} {kind} {_node(w)}")


def table(rows: Iterable[tuple[Settings, HourlyCost]]) -> str:
    """A Markdown table, one row per topology."""
    lines = ["| topology | master | workers | $/h at max workers | $/h at min workers "
             "| same training nodes on-demand | saving at max |",
             "|---|---|---|---|---|---|---|"]
    as_of = set()
    for settings, c in rows:
        master, workers = _describe(settings)
        saving = 1 - c.at_max / c.on_demand_equivalent if c.on_demand_equivalent else 0.0
        lines.append(f"| {c.topology} | {master} | {workers} | {c.at_max:.2f} | {c.at_min:.2f} "
                     f"| {c.on_demand_equivalent:.2f} | {saving:.0%} |")
        as_of.add(c.as_of)
    lines.append(f"\nPrices as of {', '.join(sorted(as_of))} (conf/cost/gcp.yaml); compute only.")
    return "\n".join(lines)
