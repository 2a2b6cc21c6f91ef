"""What the job costs, from the price table in config (`cost.*`, with the date and source the prices
were read from), and what the same work would have cost on on-demand machines.

A node's hourly price is its machine type's price plus its GPUs' (`cost.machine_hourly.<machine>` +
`gpus_per_node` x `cost.gpu_hourly.<gpu>`), per provisioning model (`spot`, `on_demand`).

Definitions used by the sinks and the goodput summary:
- cost so far = job hourly price x the time some process of the job was alive (paid machine time);
- on-demand equivalent = what the productive training time would have cost on on-demand machines of
  the same shape. It charges the on-demand baseline no startup or checkpoint time, so the savings
  below are a lower bound;
- savings = on-demand equivalent - cost so far;
- cost per productive step = cost so far / steps that were not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.config import PROVISIONING, ConfigError, price


def _price(cost_cfg: Mapping[str, Any], table: str, item: str, provisioning: str) -> float:
    key = f"cost.{table}.{item}.{provisioning}"
    try:
        value = cost_cfg[table][item][provisioning]
    except (KeyError, TypeError):
        known = ", ".join(sorted((cost_cfg.get(table) or {}).keys())) or "none"
        raise ConfigError(f"{key} is not in the price table; known {table}: {known}") from None
    return price(key, value)


def node_hourly(cost_cfg: Mapping[str, Any], machine_type: str, gpu_type: str | None,
                gpus_per_node: int, provisioning: str) -> float:
    """USD per hour of one node."""
    if provisioning not in PROVISIONING:
        raise ConfigError(f"provisioning {provisioning!r} is not one of {', '.join(PROVISIONING)}")
    if gpus_per_node < 0:
        raise ConfigError(f"gpus_per_node={gpus_per_node} must be >= 0")
    price = _price(cost_cfg, "machine_hourly", machine_type, provisioning)
    if gpus_per_node:
        if not gpu_type:
            raise ConfigError(f"gpus_per_node={gpus_per_node} needs a gpu type from cost.gpu_hourly")
        price += gpus_per_node * _price(cost_cfg, "gpu_hourly", gpu_type, provisioning)
    return price


@dataclass(frozen=True)
class CostModel:
    hourly: float  # USD per hour of the whole job as provisioned
    on_demand_hourly: float  # the same nodes, all on-demand
    source: str
    as_of: str

    @classmethod
    def from_config(cls, cost_cfg: Mapping[str, Any], machine_type: str, gpu_type: str | None,
                    gpus_per_node: int, spot_nodes: int, on_demand_nodes: int = 0) -> CostModel:
        if spot_nodes < 0 or on_demand_nodes < 0 or spot_nodes + on_demand_nodes == 0:
            raise ConfigError(f"node counts spot={spot_nodes}, on_demand={on_demand_nodes}: "
                              "need >= 0 each and at least one node")
        if not cost_cfg:
            raise ConfigError("cost: no price table; compose a cost config (e.g. `cost: gcp`)")
        spot = node_hourly(cost_cfg, machine_type, gpu_type, gpus_per_node, "spot")
        on_demand = node_hourly(cost_cfg, machine_type, gpu_type, gpus_per_node, "on_demand")
        return cls(hourly=spot_nodes * spot + on_demand_nodes * on_demand,
                   on_demand_hourly=(spot_nodes + on_demand_nodes) * on_demand,
                   source=str(cost_cfg.get("source", "")), as_of=str(cost_cfg.get("as_of", "")))

    def cost_so_far(self, paid_s: float) -> float:
        return self.hourly * paid_s / 3600.0

    def on_demand_equivalent(self, productive_s: float) -> float:
        return self.on_demand_hourly * productive_s / 3600.0

    def savings(self, paid_s: float, productive_s: float) -> float:
        return self.on_demand_equivalent(productive_s) - self.cost_so_far(paid_s)

    def cost_per_productive_step(self, paid_s: float, productive_steps: int) -> float | None:
        return self.cost_so_far(paid_s) / productive_steps if productive_steps > 0 else None

    def metrics(self, paid_s: float, productive_s: float, productive_steps: int) -> dict[str, float]:
        """The cost figures for W&B and the goodput summary (per step only once a step counts)."""
        out = {
            "cost_usd": self.cost_so_far(paid_s),
            "on_demand_equivalent_usd": self.on_demand_equivalent(productive_s),
            "savings_usd": self.savings(paid_s, productive_s),
        }
        per_step = self.cost_per_productive_step(paid_s, productive_steps)
        if per_step is not None:
            out["cost_per_productive_step_usd"] = per_step
        return out
