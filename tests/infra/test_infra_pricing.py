"""Hourly cost per topology at the configured prices."""

from __future__ import annotations

import pytest

from harness.config import ConfigError
from infra import pricing, settings
from infra.__main__ import main

PRICES = {
    "as_of": "2025-11-16",
    "gpu_hourly": {"nvidia-tesla-a100": {"spot": 1.0, "on_demand": 3.0}},
    "machine_hourly": {"a2-highgpu-1g": {"spot": 0.5, "on_demand": 1.0},
                       "e2-standard-2": {"spot": 0.01, "on_demand": 0.1}},
}


def test_hybrid_prices_the_master_on_demand_and_workers_spot():
    c = pricing.hourly_cost(settings.load(["topology=hybrid"]), PRICES)
    assert (c.master, c.worker) == (4.0, 1.5)
    assert c.at_max == pytest.approx(4.0 + 4 * 1.5) and c.at_min == pytest.approx(4.0 + 1 * 1.5)
    assert c.on_demand_equivalent == pytest.approx(5 * 4.0)


def test_all_spot_coordinator_costs_little_and_does_not_train():
    c = pricing.hourly_cost(settings.load(["topology=all_spot", "topology.workers.max=8"]), PRICES)
    assert c.master == pytest.approx(0.1) and c.at_max == pytest.approx(0.1 + 8 * 1.5)
    assert c.on_demand_equivalent == pytest.approx(8 * 4.0)


def test_on_demand_is_its_own_baseline():
    c = pricing.hourly_cost(settings.load(["topology=on_demand"]), PRICES)
    assert c.at_max == pytest.approx(c.on_demand_equivalent)


def test_a_missing_price_names_the_key():
    with pytest.raises(ConfigError, match=r"cost.machine_hourly.n1-standard-8.on_demand is not in the price table"):
        pricing.hourly_cost(settings.load(["topology.master.machine_type=n1-standard-8",
                                           "topology.master.gpu_type=nvidia-tesla-t4"]), PRICES)


def test_configured_price_table_covers_the_defaults(capsys):
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    for topology in ("hybrid", "all_spot", "on_demand"):
        assert f"| {topology} |" in out
    assert "Prices as of 2025-11-16" in out
    assert main(["cost", "topology=all_spot"]) == 0
    assert "| hybrid |" not in capsys.readouterr().out
