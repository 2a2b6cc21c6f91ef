"""Goodput from a realistic two-incarnation ledger, against a breakdown computed by hand."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from harness.goodput import find_ledger, main
from harness.telemetry import events as ev
from harness.telemetry.breakdown import CATEGORIES, PHASES, breakdown
from harness.telemetry.table import goodput_table

T0 = 1_000_000.0


def e(t: float, kind: str, inc: str, rank: int = 0, node: str = "vm-a", **fields) -> dict:
    return {"t": T0 + t, "kind": kind, "incarnation": inc, "rank": rank, "node": node, **fields}


def two_incarnations() -> list[dict]:
    """Incarnation A trains to step 25, is preempted, and its emergency save (to the local SSD) dies
    with the VM; B restores the step-20 checkpoint from the durable tier and trains to step 40. A rank
    on a second node outlives A's rank 0 by one second; its own step events must not count."""
    a, b, w = "A", "B", "A-worker"
    return [
        e(0, ev.PROCESS_START, a, world_size=2), e(0, ev.JOB_START, a, wandb_run_id="run1", hourly_usd=36.0,
                                                   on_demand_hourly_usd=72.0),
        e(1, ev.PROCESS_START, w, rank=1, node="vm-b", world_size=2),
        e(10, ev.RENDEZVOUS_DONE, a),
        e(35, ev.STEPS, a, first=1, last=10, seconds=20.0),  # steps [15, 35]: startup 0-15
        e(37, ev.CKPT_BLOCK, a, step=10, seconds=2.0),
        e(60, ev.STEPS, a, first=11, last=20, seconds=20.0),  # [40, 60]; 37-40 other
        e(60, ev.STEPS, w, rank=1, node="vm-b", first=1, last=20, seconds=45.0),  # ignored: rank 1
        e(62, ev.CKPT_BLOCK, a, step=20, seconds=2.0),
        e(75, ev.STEPS, a, first=21, last=25, seconds=10.0),  # [65, 75], recomputed later: lost
        e(76, ev.PREEMPTION_NOTICE, a, source="SIGTERM", step=25),
        e(76, ev.PREEMPTION_NOTICE, w, rank=1, node="vm-b", source="metadata"),
        e(80, ev.EMERGENCY_SAVE, a, step=25, seconds=3.0, tier="local"),  # [77, 80]
        e(81, ev.EXIT, a, code=75),
        e(82, ev.EXIT, w, rank=1, node="vm-b", code=75),
        # 82-200: nothing of the job alive (VM recreated)
        e(200, ev.PROCESS_START, b, world_size=1),
        e(210, ev.RENDEZVOUS_DONE, b),
        e(212, ev.RESTORE_START, b),
        e(222, ev.RESTORE_END, b, step=20),
        e(245, ev.STEPS, b, first=21, last=30, seconds=20.0),  # [225, 245]
        e(247, ev.CKPT_BLOCK, b, step=30, seconds=2.0),
        e(270, ev.STEPS, b, first=31, last=40, seconds=20.0),  # [250, 270]
        e(272, ev.CKPT_BLOCK, b, step=40, seconds=2.0),
        e(273, ev.EXIT, b, code=0),
    ]


EXPECTED = {
    "productive": 20 + 20 + 20 + 20,
    "lost": 10,
    "checkpoint": 2 + 2 + 3 + 2 + 2,
    "restore": 10,
    "startup": 15 + (12 + 3),  # A: 0-15; B: 200-212 and 222-225
    "downtime": 200 - 82,
    "other": (3 + 3 + 2 + 1 + 1) + (3 + 1),  # A: 37-40, 62-65, 75-77, 80-81, worker 81-82; B: 247-250, 272-273
}


def test_breakdown_matches_hand_computation():
    b = breakdown(two_incarnations())
    assert b.total_s == pytest.approx(273)
    assert sum(EXPECTED.values()) == 273
    assert b.seconds == pytest.approx(EXPECTED)
    assert b.goodput == pytest.approx(80 / 273)
    assert (b.preemptions, b.restarts, b.world_sizes, b.last_step) == (1, 1, (2, 1), 40)
    assert (b.productive_steps, b.lost_steps) == (40, 5)
    assert b.running_s == pytest.approx(273 - 118)
    assert b.job_info["wandb_run_id"] == "run1"
    assert [life.exit_code for life in b.lives] == [75, 75, 0]
    m = b.metrics()
    assert m["badput/downtime"] == pytest.approx(118 / 273)
    assert set(CATEGORIES) == {k.split("/")[1] for k in m if k.startswith("seconds/")}


def test_breakdown_is_order_independent_and_segments_tile_the_job():
    events = two_incarnations()
    b = breakdown(list(reversed(events)))
    assert b.seconds == pytest.approx(EXPECTED)
    assert b.segments[0].start == b.start and b.segments[-1].end == b.end
    assert all(x.end == y.start for x, y in zip(b.segments, b.segments[1:], strict=False))
    assert [s.category for s in b.segments[:3]] == ["startup", "productive", "checkpoint"]


def test_partially_recomputed_batch_loses_only_its_recomputed_tail():
    events = [e(0, ev.PROCESS_START, "A"), e(100, ev.STEPS, "A", first=1, last=10, seconds=100.0),
              e(101, ev.EXIT, "A", code=75),
              e(200, ev.PROCESS_START, "B"), e(240, ev.STEPS, "B", first=9, last=12, seconds=40.0)]
    b = breakdown(events)
    assert b.seconds["lost"] == pytest.approx(20.0)  # steps 9 and 10 of A's batch
    assert b.seconds["productive"] == pytest.approx(80.0 + 40.0)
    assert b.seconds["startup"] == pytest.approx(200.0 - 200.0 + 0.0)  # B's first step starts at 200
    assert (b.productive_steps, b.lost_steps) == (12, 2)


def test_a_job_that_stopped_without_finishing_is_counted_to_now_and_its_goodput_falls():
    """B was killed after its last checkpoint and nothing of the job ran again."""
    events = two_incarnations()[:-1]
    at_1000, at_2000 = breakdown(events, now=T0 + 1000), breakdown(events, now=T0 + 2000)
    assert not at_1000.finished
    assert at_1000.total_s == pytest.approx(1000)
    assert at_1000.seconds["downtime"] == pytest.approx(118 + (1000 - 272))
    assert at_1000.goodput == pytest.approx(80 / 1000)
    assert at_2000.goodput == pytest.approx(80 / 2000)
    assert at_1000.segments[-1].category == "downtime" and at_1000.segments[-1].end == T0 + 1000


def test_a_finished_job_ends_at_its_last_event_whenever_it_is_read():
    b = breakdown(two_incarnations(), now=T0 + 5000)
    assert b.finished and b.total_s == pytest.approx(273) and b.seconds == pytest.approx(EXPECTED)


def with_recorded_start() -> list[dict]:
    """B as the launcher starts it today: its launcher started at 195, the process at 200; its
    rendezvous ran 208-210, the restore 212-222, its first step ended at 227 (the step [225, 227])."""
    events = [x for x in two_incarnations() if x["incarnation"] != "B" or x["kind"] != ev.RENDEZVOUS_DONE]
    for x in events:
        if x["incarnation"] == "B" and x["kind"] == ev.PROCESS_START:
            x["launched"] = T0 + 195
        if x["incarnation"] == "B" and x["kind"] == ev.RESTORE_END:
            x["tier"] = "local"
    return [*events, e(210, ev.RENDEZVOUS_DONE, "B", seconds=2.0), e(227, ev.FIRST_STEP, "B", step=21, seconds=2.0)]


def test_a_start_is_split_from_its_launch_to_its_first_step_and_startup_counts_from_the_launch():
    b = breakdown(with_recorded_start())
    assert [s.incarnation for s in b.startups] == ["B"]  # A's ledger predates the phases: no split
    (start,) = b.startups
    assert start.restored_step == 20 and list(start.phases) == list(PHASES)
    assert start.phases == pytest.approx({"launch": 5, "imports": 8, "rendezvous": 2, "build": 2, "restore": 10,
                                          "first_step": 5})
    assert start.total_s == pytest.approx(227 - 195)
    assert b.seconds == pytest.approx({**EXPECTED, "startup": EXPECTED["startup"] + 5,
                                       "downtime": EXPECTED["downtime"] - 5})  # 195-200: the launcher's
    m = b.metrics()
    assert m["start_seconds/launch"] == pytest.approx(5) and m["start_seconds/total"] == pytest.approx(32)


def test_the_goodput_tables_startup_row_shows_the_latest_starts_split():
    console = Console(record=True, width=120)
    console.print(goodput_table(breakdown(with_recorded_start())))
    rows = [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]
    at = rows.index("startup 0:00:35.0 12.8%")
    assert rows[at + 1:at + 8] == ["latest start (from step 20) 32.00 s", "launch 5.00 s 16%", "imports 8.00 s 25%",
                                   "rendezvous 2.00 s 6%", "build 2.00 s 6%", "restore 10.00 s 31%",
                                   "first step 5.00 s 16%"]
    console = Console(record=True, width=120)
    console.print(goodput_table(breakdown(two_incarnations())))
    assert "latest start" not in console.export_text()


def test_empty_ledger():
    b = breakdown([])
    assert b.total_s == 0 and b.goodput == 0.0


def test_cli_prints_table_and_writes_timeline(tmp_path, capsys):
    ledger = tmp_path / "run" / "checkpoints" / "ledger"
    ledger.mkdir(parents=True)
    for inc in ("A", "A-worker", "B"):
        lines = [json.dumps(x) for x in two_incarnations() if x["incarnation"] == inc]
        (ledger / f"{inc}.jsonl").write_text("\n".join(lines) + "\n")
    assert find_ledger(str(tmp_path / "run"))[0] == str(ledger)
    assert main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the title wraps at the console's width
    assert "goodput 29.3%" in flat and "to the job's end" in flat and "downtime" in out and "savings ($)" in out
    assert "2, 1" in out  # world sizes
    png = tmp_path / "run" / "goodput_timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out.replace("\n", "")
    assert main([str(tmp_path / "nothing")]) == 2


def test_cli_counts_an_unfinished_job_to_now(tmp_path, capsys):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    lines = [json.dumps(x) for x in two_incarnations()[:-1]]  # the job never finished
    (ledger / "all.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(ledger), "--out", str(tmp_path / "t.png")]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "goodput 0.0%" in flat and "to now" in flat  # T0 is long ago: 80 s of a decades-long job
