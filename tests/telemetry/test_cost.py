"""Prices from config: node prices, cost so far, savings and cost per productive step."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from harness.config import CONF_DIR, ConfigError
from harness.cost import CostModel, node_hourly

PRICES = {  # the shape of conf/cost/gcp.yaml
    "source": "test table", "as_of": "2025-11-16",
    "gpu_hourly": {"nvidia-h100-80gb": {"spot": 2.25, "on_demand": 7.50},
                   "nvidia-a100-80gb": {"spot": 1.57, "on_demand": 3.67}},
    "machine_hourly": {"a3-highgpu-8g": {"spot": 4.35, "on_demand": 14.51},
                       "e2-standard-2": {"spot": 0.02, "on_demand": 0.067}},
}


def test_node_price_is_machine_plus_gpus():
    assert node_hourly(PRICES, "a3-highgpu-8g", "nvidia-h100-80gb", 8, "spot") == pytest.approx(4.35 + 8 * 2.25)
    assert node_hourly(PRICES, "a3-highgpu-8g", "nvidia-h100-80gb", 8, "on_demand") == pytest.approx(74.51)
    assert node_hourly(PRICES, "e2-standard-2", None, 0, "on_demand") == pytest.approx(0.067)


def test_cost_figures_for_a_hybrid_job():
    cost = CostModel.from_config(PRICES, "a3-highgpu-8g", "nvidia-h100-80gb", 8, spot_nodes=3, on_demand_nodes=1)
    assert cost.hourly == pytest.approx(3 * 22.35 + 74.51)
    assert cost.on_demand_hourly == pytest.approx(4 * 74.51)
    assert (cost.source, cost.as_of) == ("test table", "2025-11-16")
    paid_s, productive_s = 2 * 3600.0, 1.5 * 3600.0
    assert cost.cost_so_far(paid_s) == pytest.approx(2 * 141.56)
    assert cost.on_demand_equivalent(productive_s) == pytest.approx(1.5 * 298.04)
    assert cost.savings(paid_s, productive_s) == pytest.approx(1.5 * 298.04 - 2 * 141.56)
    assert cost.cost_per_productive_step(paid_s, 1000) == pytest.approx(2 * 141.56 / 1000)
    assert cost.cost_per_productive_step(paid_s, 0) is None
    assert set(cost.metrics(paid_s, productive_s, 0)) == {"cost_usd", "on_demand_equivalent_usd", "savings_usd"}


@pytest.mark.parametrize(("args", "message"), [
    (("n2-standard-4", None, 0, 1, 0), r"cost.machine_hourly.n2-standard-4.spot is not in the price table"),
    (("a3-highgpu-8g", "nvidia-b200", 8, 1, 0), r"cost.gpu_hourly.nvidia-b200.spot"),
    (("a3-highgpu-8g", None, 8, 1, 0), r"gpus_per_node=8 needs a gpu type"),
    (("a3-highgpu-8g", "nvidia-h100-80gb", 8, 0, 0), r"at least one node"),
    (("a3-highgpu-8g", "nvidia-h100-80gb", 8, -1, 2), r"node counts"),
])
def test_bad_inputs_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        CostModel.from_config(PRICES, *args)


def test_negative_price_is_rejected():
    bad = {**PRICES, "machine_hourly": {"x": {"spot": -1, "on_demand": 1}}}
    with pytest.raises(ConfigError, match=r"cost.machine_hourly.x.spot=-1"):
        node_hourly(bad, "x", None, 0, "spot")


def test_the_shipped_price_table_prices_the_planner_default():
    table = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "cost" / "gcp.yaml"))
    plan = OmegaConf.load(CONF_DIR / "plan" / "default.yaml")
    assert table["source"] and table["as_of"]
    assert node_hourly(table, plan.machine_type, plan.gpu_type, plan.gpus_per_node, "spot") > 0
    assert table["gpu_hourly"]["nvidia-a100-80gb"] == {"spot": 1.57, "on_demand": 3.67}  # guide 001
