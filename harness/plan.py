"""The cost planner: all-Spot vs hybrid vs on-demand for `train.max_steps`, before anything runs.

    python -m harness.plan [overrides]       e.g. plan.mtbi_spot_h=2 train.max_steps=100000
    python -m harness.plan optim.lr=1e-3,3e-4 train.max_steps=20000,50000   a sweep: harness/sweep/plan.py

Inputs: `plan.*` (conf/plan/default.yaml), `train.max_steps`, `checkpoint.interval_steps` (an int, or
`auto` for Young/Daly per mode) and the price table `cost.*`. Any other override goes to the job config.

The model (per mode). Interruptions arrive as a Poisson process while the job runs, at rate
lambda = spot_nodes / M_spot + on_demand_nodes / M_on_demand (M per node; any node's loss interrupts
the job). The job's work is A = N t + ceil(N / tau) C: N steps of t seconds and a checkpoint blocking
C every tau steps and at the end. An interruption costs downtime D (VM recreated, processes started,
rendezvous) then a restore R, itself exposed to interruptions, so recovering takes
Q = D + (e^(lambda R) - 1)(1/lambda + D) on average. The job's first start also takes D.
- With an emergency save (0 < E and the step or checkpoint in flight plus E fit in the notice): no work
  is lost and each interruption costs E + Q. By Wald's identity, wall = D + lambda A (E + F) with
  F = e^(lambda R) (1/lambda + D).
- Without: an interruption loses everything since the last checkpoint. A segment of s = tau t + C
  seconds takes F (e^(lambda s) - 1) on average (Daly 2006), so wall = D + F sum_segments (e^(lambda s) - 1).
Both are expectations, exact under these assumptions (to first order in lambda t for the step that
finishes after a notice); expected goodput = N t / E[wall]. Cost = hourly price of all nodes x wall,
minus the downtime of the interrupted node, which is not running and not billed. The simulation
draws exponential interruptions and plays the same mechanics step by step; `--validate` compares the
two over a grid of cases.
The optimal interval printed is Young/Daly's sqrt(2 C M) with M = 1 / lambda.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from harness.cadence import interval_steps, young_daly_interval_s
from harness.config import CONF_DIR, ConfigError, load, structured
from harness.cost import node_hourly

HOUR = 3600.0
MIN_SIMULATED_GOODPUT = 0.01  # below this a simulated run replays an impractical number of restarts


@dataclass
class PlanConfig:
    step_time_s: float = 2.0  # t: one optimizer step of the whole job
    checkpoint_cost_s: float = 2.0  # C: training blocked per periodic checkpoint
    restore_s: float = 60.0  # R: load the checkpoint after a restart
    restart_s: float = 300.0  # D: interruption to processes ready (VM recreate, boot, start, rendezvous)
    emergency_save_s: float = 10.0  # E: save on notice; 0 = none (work since the last checkpoint is lost)
    notice_s: float = 30.0  # time from the preemption notice to the hard stop
    mtbi_spot_h: float = 4.0  # per node
    mtbi_on_demand_h: float = 720.0  # per node
    nodes: int = 2
    hybrid_on_demand_nodes: int = 1  # on-demand nodes of the hybrid mode; 0 = no hybrid column
    machine_type: str = "a3-highgpu-8g"
    gpu_type: str | None = "nvidia-h100-80gb"
    gpus_per_node: int = 8
    simulate_runs: int = 300  # Monte-Carlo runs per mode; 0 = no simulation
    seed: int = 0


@dataclass(frozen=True)
class Mode:
    name: str
    spot_nodes: int
    on_demand_nodes: int


@dataclass(frozen=True)
class Expectation:
    wall_s: float
    interruptions: float
    goodput: float


def validate(p: PlanConfig) -> None:
    """ConfigError naming the plan key for inputs the model cannot use."""
    if not p.step_time_s > 0:
        raise ConfigError(f"plan.step_time_s={p.step_time_s} must be > 0")
    for key in ("checkpoint_cost_s", "restore_s", "restart_s", "emergency_save_s", "notice_s"):
        if not getattr(p, key) >= 0:
            raise ConfigError(f"plan.{key}={getattr(p, key)} must be >= 0")
    for key in ("mtbi_spot_h", "mtbi_on_demand_h"):
        if not getattr(p, key) > 0:
            raise ConfigError(f"plan.{key}={getattr(p, key)} must be > 0 hours (.inf for never)")
    if p.nodes < 1:
        raise ConfigError(f"plan.nodes={p.nodes} must be >= 1")
    if not 0 <= p.hybrid_on_demand_nodes < p.nodes:
        raise ConfigError(f"plan.hybrid_on_demand_nodes={p.hybrid_on_demand_nodes} must be in "
                          f"[0, plan.nodes - 1 = {p.nodes - 1}]")
    if p.simulate_runs < 0:
        raise ConfigError(f"plan.simulate_runs={p.simulate_runs} must be >= 0")


def modes(p: PlanConfig) -> list[Mode]:
    out = [Mode("all-Spot", p.nodes, 0)]
    if p.hybrid_on_demand_nodes:
        out.append(Mode("hybrid", p.nodes - p.hybrid_on_demand_nodes, p.hybrid_on_demand_nodes))
    return out + [Mode("on-demand", 0, p.nodes)]


def interruption_rate(p: PlanConfig, mode: Mode) -> float:
    """Interruptions of the job per second."""
    return (mode.spot_nodes / p.mtbi_spot_h + mode.on_demand_nodes / p.mtbi_on_demand_h) / HOUR


def emergency_save_works(p: PlanConfig) -> bool:
    return p.emergency_save_s > 0 and max(p.step_time_s, p.checkpoint_cost_s) + p.emergency_save_s <= p.notice_s


def expected(p: PlanConfig, max_steps: int, interval: int, rate: float) -> Expectation:
    """The analytical model of the module docstring."""
    n, t, c, r, d = max_steps, p.step_time_s, p.checkpoint_cost_s, p.restore_s, p.restart_s
    full, rest = divmod(n, interval)
    work = n * t + (full + (rest > 0)) * c
    if rate == 0:
        return Expectation(d + work, 0.0, n * t / (d + work))
    try:
        f = math.exp(rate * r) * (1 / rate + d)
        if emergency_save_works(p):
            wall, k = d + rate * work * (p.emergency_save_s + f), rate * work * math.exp(rate * r)
        else:
            growth = full * math.expm1(rate * (interval * t + c)) + (math.expm1(rate * (rest * t + c)) if rest else 0)
            wall, k = d + f * growth, math.exp(rate * r) * growth
    except OverflowError:  # interruptions far more frequent than a segment or a restore: never finishes
        return Expectation(math.inf, math.inf, 0.0)
    return Expectation(wall, k, n * t / wall)


def simulate_once(p: PlanConfig, max_steps: int, interval: int, rate: float, rng: random.Random) -> Expectation:
    """One run of the mechanics: steps, checkpoints, exponential interruptions, restarts."""
    t, c = p.step_time_s, p.checkpoint_cost_s
    emergency = emergency_save_works(p)
    draw = (lambda: rng.expovariate(rate)) if rate > 0 else (lambda: math.inf)
    wall, k, pos, committed = p.restart_s, 0, 0, 0
    left = draw()  # running time until the next interruption
    while pos < max_steps:
        target = min(max_steps, (pos // interval + 1) * interval)
        segment = (target - pos) * t + c
        if left >= segment:
            wall, left, pos, committed = wall + segment, left - segment, target, target
            continue
        k += 1
        if emergency:  # the step or checkpoint in flight finishes, then the emergency save
            done = math.ceil(left / t) if left < (target - pos) * t else target - pos
            unit = done * t if done < target - pos else segment
            wall, pos, committed = wall + unit + p.emergency_save_s, pos + done, pos + done
        else:
            wall, pos = wall + left, committed
        while True:  # downtime, then a restore that may itself be interrupted
            wall, left = wall + p.restart_s, draw()
            if left >= p.restore_s:
                wall, left = wall + p.restore_s, left - p.restore_s
                break
            wall, k = wall + left, k + 1
    return Expectation(wall, k, max_steps * t / wall)


def simulate(p: PlanConfig, max_steps: int, interval: int, rate: float, runs: int,
             seed: int) -> tuple[float, float]:
    """Goodput of `runs` seeded runs, N t / mean wall time (like the model: a ratio of expectations,
    not a mean of ratios), and the half-width of its 95% confidence interval."""
    rng = random.Random(seed)
    walls = [simulate_once(p, max_steps, interval, rate, rng).wall_s for _ in range(runs)]
    mean = sum(walls) / runs
    sem = math.sqrt(sum((w - mean) ** 2 for w in walls) / max(1, runs - 1) / runs)
    goodput = max_steps * p.step_time_s / mean
    return goodput, 1.96 * goodput * sem / mean


def chosen_interval(setting: Any, p: PlanConfig, rate: float, max_steps: int) -> int:
    """`checkpoint.interval_steps`: an int as given, `auto` = Young/Daly for this mode."""
    if setting == "auto":
        return interval_steps(p.checkpoint_cost_s, 1 / rate, p.step_time_s, max_steps) if rate else max_steps
    return int(setting)


def plan_config(overrides: Sequence[str]) -> tuple[PlanConfig, Any, int, Any]:
    """(plan inputs, price table, train.max_steps, checkpoint.interval_steps) from conf/ + overrides.
    `plan.*` overrides apply to conf/plan/default.yaml; the rest compose the job config."""
    mine = [o for o in overrides if o.startswith("plan.")]
    job = load([o for o in overrides if not o.startswith("plan.")])
    node = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR, "plan", "default.yaml")),
                           OmegaConf.from_dotlist([o.removeprefix("plan.") for o in mine]))
    p = structured(PlanConfig, node, "plan")
    validate(p)
    if job.get("cost") is None:
        raise ConfigError("cost: no price table in the job config; compose one (e.g. `cost: gcp`)")
    return p, OmegaConf.to_container(job.cost, resolve=True), int(job.train.max_steps), job.checkpoint.interval_steps


@dataclass(frozen=True)
class ModePlan:
    mode: Mode
    rate: float
    interval: int
    expectation: Expectation
    hourly: float
    cost: float


def plan_mode(p: PlanConfig, prices: Mapping[str, Any], mode: Mode, max_steps: int, setting: Any) -> ModePlan:
    """Expected goodput, wall time and cost of one mode; the interrupted node is not billed while down."""
    spot = node_hourly(prices, p.machine_type, p.gpu_type, p.gpus_per_node, "spot")
    on_demand = node_hourly(prices, p.machine_type, p.gpu_type, p.gpus_per_node, "on_demand")
    rate = interruption_rate(p, mode)
    interval = chosen_interval(setting, p, rate, max_steps)
    e = expected(p, max_steps, interval, rate)
    hourly = mode.spot_nodes * spot + mode.on_demand_nodes * on_demand
    # The price of the node that is down, weighted by which kind of node gets interrupted.
    down = (mode.spot_nodes / p.mtbi_spot_h * spot + mode.on_demand_nodes / p.mtbi_on_demand_h * on_demand) / (
        rate * HOUR) if rate else 0.0
    cost = (hourly * e.wall_s - down * e.interruptions * p.restart_s) / HOUR
    return ModePlan(mode, rate, interval, e, hourly, cost)


def table(p: PlanConfig, prices: Mapping[str, Any], max_steps: int, setting: Any) -> Table:
    plans = [plan_mode(p, prices, m, max_steps, setting) for m in modes(p)]
    baseline = plans[-1].cost
    rows: dict[str, list[str]] = {}
    for mp in plans:
        e, rate = mp.expectation, mp.rate
        yd_s = young_daly_interval_s(p.checkpoint_cost_s, 1 / rate) if rate else math.inf
        values = {
            "nodes: spot + on-demand": f"{mp.mode.spot_nodes} + {mp.mode.on_demand_nodes}",
            "job MTBI (h)": f"{1 / rate / HOUR:.2f}" if rate else "inf",
            "price ($/h)": f"{mp.hourly:,.2f}",
            "Young/Daly interval": f"{yd_s:,.0f} s ({yd_s / p.step_time_s:,.0f} steps)" if rate else "-",
            "interval used (steps)": str(mp.interval),
            "interruptions": f"{e.interruptions:.2f}",
            "goodput": f"{e.goodput:.2%}",
            "wall time (h)": f"{e.wall_s / HOUR:,.2f}",
            "cost ($)": f"{mp.cost:,.2f}",
            "cost vs on-demand": f"{mp.cost / baseline:.0%}",
        }
        if p.simulate_runs and e.goodput >= MIN_SIMULATED_GOODPUT:
            mean, ci = simulate(p, max_steps, mp.interval, rate, p.simulate_runs, p.seed)
            values["goodput, simulated"] = f"{mean:.2%} ± {ci:.2%}"
        elif p.simulate_runs:
            values["goodput, simulated"] = "-"  # a job that (nearly) never finishes takes forever to play
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    out = Table(title=f"{max_steps:,} steps of {p.step_time_s:g} s on {p.nodes} x {p.machine_type}"
                      f" ({p.gpus_per_node} x {p.gpu_type}): expected values",
                caption=f"Young/Daly = sqrt(2 C MTBI); simulated: mean of {p.simulate_runs} runs ± 95% CI")
    out.add_column("", no_wrap=True)
    for mp in plans:
        out.add_column(mp.mode.name, justify="right")
    for key, values in rows.items():
        out.add_row(key, *values)
    return out


def validation_table(base: PlanConfig, max_steps: int, runs: int) -> Table:
    """Analytical vs simulated goodput over a grid of cases (all-Spot mode)."""
    out = Table(title=f"Analytical vs simulated goodput ({runs} runs each, {max_steps} steps)")
    for col in ("emergency save", "spot MTBI (h)", "interval", "analytical", "simulated ± 95% CI", "diff / CI"):
        out.add_column(col, justify="right")
    mode = modes(base)[0]
    for emergency_s in dict.fromkeys((base.emergency_save_s, 0.0)):
        for mtbi_h in (0.5, 2.0, 8.0):
            p = replace(base, emergency_save_s=emergency_s, mtbi_spot_h=mtbi_h)
            rate = interruption_rate(p, mode)
            yd = chosen_interval("auto", p, rate, max_steps)
            for interval in (yd, min(max_steps, 4 * yd)):
                e = expected(p, max_steps, interval, rate)
                row = ["yes" if emergency_save_works(p) else "no", f"{mtbi_h:g}", str(interval), f"{e.goodput:.2%}"]
                if e.goodput < MIN_SIMULATED_GOODPUT:
                    out.add_row(*row, "-", "-")
                    continue
                mean, ci = simulate(p, max_steps, interval, rate, runs, p.seed)
                out.add_row(*row, f"{mean:.2%} ± {ci:.2%}", f"{abs(mean - e.goodput) / ci:.2f}" if ci else "-")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. plan.mtbi_spot_h=2")
    parser.add_argument("--validate", action="store_true",
                        help="compare the analytical goodput with the simulation over a grid of cases")
    args = parser.parse_args(argv)
    console = Console()
    try:
        from harness.sweep import plan as sweep_plan  # a sweep's overrides: every job, and the total

        if not args.validate and sweep_plan.is_sweep(args.overrides):
            console.print(sweep_plan.table(args.overrides))
            return 0
        p, prices, max_steps, setting = plan_config(args.overrides)
        if args.validate:
            console.print(validation_table(p, max_steps, max(p.simulate_runs, 1)))
            return 0
        console.print(table(p, prices, max_steps, setting))
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        return 2
    console.print(f"Emergency save {'used' if emergency_save_works(p) else 'not used'}; MTBI per node: spot "
                  f"{p.mtbi_spot_h:g} h, on-demand {p.mtbi_on_demand_h:g} h. Prices as of "
                  f"{prices.get('as_of', '?')}: {prices.get('source', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
