"""The planner: the analytical model against hand-computed values and against its own simulation,
and clear errors for bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from harness.config import ConfigError
from harness.plan import (
    Mode,
    PlanConfig,
    chosen_interval,
    expected,
    interruption_rate,
    main,
    plan_config,
    plan_mode,
    simulate,
    validate,
)
from tests.telemetry.test_cost import PRICES

BASE = PlanConfig(step_time_s=1.0, checkpoint_cost_s=2.0, restore_s=0.0, restart_s=10.0, emergency_save_s=0.0,
                  simulate_runs=0)


def test_no_interruptions_is_work_plus_checkpoints_plus_first_start():
    e = expected(BASE, max_steps=100, interval=30, rate=0.0)
    # 100 steps + checkpoints at 30, 60, 90, 100 (4 x 2 s) + the first start (10 s) = 118 s
    assert e.wall_s == pytest.approx(118.0)
    assert e.goodput == pytest.approx(100 / 118)
    assert e.interruptions == 0


def test_emergency_save_loses_no_work():
    p = replace(BASE, emergency_save_s=5.0)
    e = expected(p, max_steps=100, interval=30, rate=1 / 1000)
    # A = 108 s of work; each of lambda A = 0.108 interruptions costs E + F = 5 + (1000 + 10) s,
    # so wall = 10 + 0.108 * 1015 = 119.62 s
    assert e.wall_s == pytest.approx(119.62)
    assert e.interruptions == pytest.approx(0.108)


def test_without_emergency_save_segments_restart_from_the_checkpoint():
    p = replace(BASE, checkpoint_cost_s=0.0, restart_s=0.0)
    e = expected(p, max_steps=100, interval=50, rate=0.01)
    # Two 50 s segments, each taking (1/lambda)(e^(lambda s) - 1) = 100 (e^0.5 - 1) = 64.872 s
    assert e.wall_s == pytest.approx(2 * 100 * math.expm1(0.5))
    assert e.goodput == pytest.approx(0.77074, abs=1e-5)


def test_young_daly_interval_per_mode():
    p = PlanConfig(step_time_s=2.0, checkpoint_cost_s=2.0, mtbi_spot_h=4.0, nodes=2)
    rate = interruption_rate(p, Mode("all-Spot", 2, 0))
    assert 1 / rate == pytest.approx(2 * 3600)  # two nodes of 4 h each: one interruption per 2 h
    assert chosen_interval("auto", p, rate, 100_000) == 85  # sqrt(2 x 2 s x 7200 s) = 169.7 s
    assert chosen_interval(50, p, rate, 100_000) == 50
    assert chosen_interval("auto", p, 0.0, 1000) == 1000


@pytest.mark.parametrize("emergency_s", [8.0, 0.0])
@pytest.mark.parametrize("mtbi_h", [0.5, 3.0])
def test_simulation_agrees_with_the_model(emergency_s, mtbi_h):
    p = PlanConfig(step_time_s=2.0, checkpoint_cost_s=2.0, restore_s=60.0, restart_s=300.0,
                   emergency_save_s=emergency_s, mtbi_spot_h=mtbi_h, nodes=1, hybrid_on_demand_nodes=0)
    rate = interruption_rate(p, Mode("all-Spot", 1, 0))
    e = expected(p, 5000, 40, rate)
    mean, ci = simulate(p, 5000, 40, rate, runs=400, seed=1)
    assert abs(mean - e.goodput) < 3 * ci, (mean, ci, e.goodput)


def test_hybrid_costs_between_spot_and_on_demand():
    p = PlanConfig(gpu_type="nvidia-h100-80gb", machine_type="a3-highgpu-8g", simulate_runs=0)
    plans = [plan_mode(p, PRICES, m, 100_000, 50) for m in
             (Mode("all-Spot", 2, 0), Mode("hybrid", 1, 1), Mode("on-demand", 0, 2))]
    assert plans[0].cost < plans[1].cost < plans[2].cost
    assert plans[0].expectation.goodput < plans[1].expectation.goodput < plans[2].expectation.goodput
    assert plans[0].hourly == pytest.approx(2 * 22.35)


@pytest.mark.parametrize(("override", "key"), [
    ("plan.mtbi_spot_h=-2", "plan.mtbi_spot_h=-2.0 must be > 0"),
    ("plan.mtbi_on_demand_h=0", "plan.mtbi_on_demand_h=0.0 must be > 0"),
    ("plan.step_time_s=0", "plan.step_time_s=0.0 must be > 0"),
    ("plan.restore_s=-1", "plan.restore_s=-1.0 must be >= 0"),
    ("plan.hybrid_on_demand_nodes=2", "plan.hybrid_on_demand_nodes=2 must be in [0, plan.nodes - 1 = 1]"),
    ("plan.nodes=abc", "plan.nodes: Value 'abc'"),
    ("plan.bogus=1", "plan.bogus"),
])
def test_bad_input_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        plan_config([override])
    assert key in str(err.value)


def test_validate_rejects_nan_step_time():
    with pytest.raises(ConfigError, match="plan.step_time_s"):
        validate(PlanConfig(step_time_s=math.nan))


def test_overrides_reach_the_plan_and_the_job():
    p, prices, max_steps, interval = plan_config(["plan.mtbi_spot_h=2", "train.max_steps=5000",
                                                  "checkpoint.interval_steps=auto"])
    assert p.mtbi_spot_h == 2.0 and max_steps == 5000 and interval == "auto"
    assert prices["as_of"]


def test_cli_prints_three_modes(capsys):
    assert main(["train.max_steps=2000", "plan.simulate_runs=20", "plan.mtbi_spot_h=2"]) == 0
    out = capsys.readouterr().out
    for text in ("all-Spot", "hybrid", "on-demand", "Young/Daly", "goodput", "cost vs on-demand", "as of"):
        assert text in out


def test_cli_validation_table(capsys):
    assert main(["--validate", "train.max_steps=1000", "plan.simulate_runs=20"]) == 0
    assert "Analytical vs simulated goodput" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error_not_a_traceback(capsys):
    assert main(["plan.mtbi_spot_h=-1"]) == 2
    assert "plan.mtbi_spot_h=-1.0 must be > 0" in capsys.readouterr().out
