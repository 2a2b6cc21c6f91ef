"""The facade the train loop calls: who writes what, the run id across incarnations, cost figures,
bounded per-step cost while every sink is failing, and the telemetry config's errors."""

from __future__ import annotations

import statistics
import time

import pytest

from harness.chaos.fake_monitoring import FakeMonitoring
from harness.config import ConfigError, load, telemetry_config
from harness.telemetry import events as ev
from harness.telemetry.ledger import read_ledger
from harness.telemetry.telemetry import Telemetry


def start(tmp_path, *overrides: str, rank: int = 0, local_rank: int = 0, **kw) -> Telemetry:
    cfg = load([f"run.dir={tmp_path}", "wandb.mode=disabled", *overrides])
    return Telemetry.start(cfg, rank=rank, local_rank=local_rank, world_size=4, node=f"vm-{rank}",
                           ledger_location=str(tmp_path / "ledger"), **kw)


def test_only_rank_zero_and_each_nodes_first_rank_write(tmp_path):
    quiet = start(tmp_path, rank=3, local_rank=1)
    node = start(tmp_path, rank=2, local_rank=0)
    for tel in (quiet, node):
        tel.event(ev.PREEMPTION_NOTICE, source="metadata")
        tel.on_step(1, 0.1, {"loss": 1.0})  # job-level: ignored off rank 0
        tel.close(75)
    assert quiet.ledger is None
    events = read_ledger(str(tmp_path / "ledger"))
    assert [(e["kind"], e["rank"]) for e in events] == [(ev.PROCESS_START, 2), (ev.PREEMPTION_NOTICE, 2),
                                                        (ev.EXIT, 2)]
    assert events[0]["world_size"] == 4 and events[0]["t"] <= time.time()


def test_run_id_is_made_once_and_reused_by_later_incarnations(tmp_path):
    first = start(tmp_path)
    first.on_step(1, 0.1, {"loss": 1.0})
    first.close(75)
    second = start(tmp_path)
    second.close(0)
    events = read_ledger(str(tmp_path / "ledger"))
    job_starts = [e for e in events if e["kind"] == ev.JOB_START]
    assert len(job_starts) == 1 and len(job_starts[0]["wandb_run_id"]) == 8
    assert len({e["incarnation"] for e in events}) == 2
    assert second.breakdown().restarts == 1


def test_every_incarnations_start_is_durable_before_it_trains(tmp_path):
    """Written when start() returns, long before the ledger's periodic flush: a process SIGKILLed at
    any later moment is still counted (restarts, world sizes, goodput)."""
    first = start(tmp_path)
    first.close(75)
    later = start(tmp_path)  # rank 0 of a later incarnation: no job_start to write with it
    leader = start(tmp_path, rank=2, local_rank=0)
    written = {(e["incarnation"], e["kind"]) for e in read_ledger(str(tmp_path / "ledger"))}
    later_inc, leader_inc = later.ledger.incarnation, leader.ledger.incarnation
    later.close(0)
    leader.close(0)
    assert later.cfg.ledger_flush_s >= 5
    assert {(later_inc, ev.PROCESS_START), (leader_inc, ev.PROCESS_START)} <= written


def test_the_first_step_of_each_incarnation_is_recorded_once(tmp_path):
    """It ends the incarnation's startup split (harness/telemetry/breakdown.py)."""
    tel = start(tmp_path)
    for step in (11, 12, 13):
        tel.on_step(step, 0.01)
    tel.close(0)
    firsts = [e for e in read_ledger(str(tmp_path / "ledger")) if e["kind"] == ev.FIRST_STEP]
    assert [(e["step"], e["seconds"]) for e in firsts] == [(11, 0.01)]


def test_process_start_is_the_processes_own_start(tmp_path):
    tel = start(tmp_path)
    started = tel.ledger.events()[0]
    tel.close(0)
    assert started["kind"] == ev.PROCESS_START
    assert started["t"] < time.time() - 0.05  # the interpreter started before this test ran


def test_job_metrics_with_cost(tmp_path):
    tel = start(tmp_path, "telemetry.cost_basis.machine_type=a2-highgpu-1g",
                "telemetry.cost_basis.gpu_type=nvidia-tesla-a100", "telemetry.cost_basis.gpus_per_node=1",
                "telemetry.cost_basis.spot_nodes=3", "telemetry.cost_basis.on_demand_nodes=1")
    for step in range(1, 11):
        time.sleep(0.01)
        tel.on_step(step, 0.01, {"loss": 1.0})
    time.sleep(0.02)
    tel.event(ev.CKPT_BLOCK, step=10, seconds=0.02)
    m = tel.job_metrics()
    tel.close(0)
    assert m["productive_steps"] == 10 and m["checkpoint_blocking_s"] == pytest.approx(0.02)
    assert m["seconds/productive"] == pytest.approx(0.1)
    assert m["cost_usd"] > 0 and m["on_demand_equivalent_usd"] > 0 and "cost_per_productive_step_usd" in m
    assert 0 < m["goodput"] < 1
    job_start = next(e for e in read_ledger(str(tmp_path / "ledger")) if e["kind"] == ev.JOB_START)
    assert job_start["hourly_usd"] == pytest.approx(3 * (0.22 + 1.15) + (0.74 + 2.93))
    assert job_start["price_as_of"]


def test_mtbi_uses_the_configured_prior_until_interruptions_are_seen(tmp_path):
    tel = start(tmp_path, "checkpoint.mtbi_s=7200")
    running = tel.breakdown().running_s  # counted from this process's start, however long ago
    assert tel.mtbi_s() == pytest.approx(7200 + running, abs=1)
    tel.close(0)


def test_step_cost_is_bounded_while_every_sink_fails(tmp_path, monkeypatch):
    import wandb

    def unreachable(**kwargs):
        time.sleep(0.2)
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", unreachable)
    dead = FakeMonitoring().start()
    client = dead.client()
    dead.stop()
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load([f"run.dir={tmp_path}", "wandb.mode=online", "telemetry.monitoring.enabled=true",
                "telemetry.monitoring.project=p", "telemetry.monitoring.period_s=10", "telemetry.retry_initial_s=0.01",
                "telemetry.ledger_flush_s=0.05", "telemetry.job_metrics_s=0.05"])
    tel = Telemetry.start(cfg, rank=0, local_rank=0, world_size=1, node="vm",
                          ledger_location=str(blocker / "ledger"), monitoring_client=client)
    tel.monitoring.period_s = 0.05  # the config insists on >= 10 s; the test wants failures quickly
    costs = []
    for step in range(1, 3001):
        started = time.perf_counter()
        tel.on_step(step, 0.001, {"loss": 1.0, "lr": 1e-3})
        costs.append(time.perf_counter() - started)
        if step % 500 == 0:
            time.sleep(0.05)  # let the background threads fail a few times
    started = time.perf_counter()
    tel.close(1)
    close_s = time.perf_counter() - started
    assert tel.ledger.errors > 0 and tel.wandb.errors > 0 and tel.monitoring.errors > 0
    assert statistics.median(costs) < 1e-4 and sorted(costs)[int(0.99 * len(costs))] < 5e-3
    assert close_s < 3 * tel.cfg.close_timeout_s
    kinds = [e["kind"] for e in tel.ledger.events()]
    assert ev.TELEMETRY_ERROR in kinds  # counted in the ledger (written when storage comes back)


@pytest.mark.parametrize(("override", "message"), [
    ("telemetry.monitoring.period_s=5", "telemetry.monitoring.period_s=5.0 must be >= 10"),
    ("telemetry.monitoring.enabled=true", "telemetry.monitoring.project is required"),
    ("telemetry.ledger_flush_s=0", "telemetry.ledger_flush_s=0.0 must be > 0"),
    ("telemetry.queue_size=x", "telemetry.queue_size=x | Value 'x' of type 'str' could not be converted to Integer"),
])
def test_config_errors_name_the_key(override, message):
    """The group is part of the job's schema: a bad value fails the load, before anything runs."""
    with pytest.raises(ConfigError) as err:
        load([override])
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="telemetry.retry_max_s"):
        telemetry_config({"retry_max_s": -1})  # the telemetry layer's own typed section, same checks


def test_cost_basis_errors_name_the_group(tmp_path):
    with pytest.raises(ConfigError, match=r"telemetry.cost_basis: cost.machine_hourly.nope.spot"):
        start(tmp_path, "telemetry.cost_basis.machine_type=nope")
