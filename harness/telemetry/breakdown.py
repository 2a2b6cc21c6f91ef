"""Goodput and badput of a whole job, computed from its ledger (all incarnations), not from one process.

Definitions (every second of the job falls in exactly one category):
- total: from the job's first event to its end: the last event once the job has finished (its latest
  rank-0 incarnation exited 0), else `now`, the reader's clock. A job that stopped training without
  finishing (every process dead, none coming back) thus shows a falling goodput: the time since its
  last event is downtime. `breakdown(events)` without `now` ends at the last event: a record read as
  history; every reader of a live job (the sinks, `make goodput`, the chaos report) passes `now`.
- An incarnation (one process start of one rank) is alive from its first to its last event. Its
  `process_start` is durable before it trains (Telemetry.start writes it at once); a process killed
  without a final flush is alive until its last flushed event, so the periodic flush
  (`telemetry.ledger_flush_s`, with a heartbeat when idle) bounds what a SIGKILL loses.
- downtime: time when no incarnation of any rank is alive.
- Job-level phases come from global rank 0's events; other ranks' events only prove their process
  was alive. While rank 0 is alive, each instant is labelled by the first that applies:
  1. checkpoint: training blocked by a periodic checkpoint (`ckpt_block`) or an emergency save
     (`emergency_save`), each the `seconds` ending at the event's time;
  2. restore: from `restore_start` to the next `restore_end` of the same incarnation (or its end);
  3. lost: step time spent on steps whose index was completed again later (recomputed after a restart);
  4. productive: step time of every other completed step;
  5. startup: from the incarnation's launch (`process_start`'s `launched`: the launcher's round or
     the torchrun agent, else the process's own start) to its first step (cut short by a preemption
     notice or exit when it never stepped), rendezvous included;
  6. other: anything else while a process is alive (logging, evaluation, time between a notice and
     the exit, a rank 0 that died while other ranks lived on).
  A `steps` event covers `seconds` of step time ending at its time; when some of its steps were
  recomputed later, the lost share (proportional to the step count) is its tail.
- goodput = productive / total; badput of a category = its seconds / total.
- a start's split (`Startup`, one per rank-0 incarnation that completed a step): from its launch to its
  first completed step, in PHASES: launch (launcher and torchrun agent, up to the process's start),
  imports (interpreter, imports, config: up to the rendezvous), rendezvous (the process group, peers
  awaited), build (model, data, checkpoint manager, telemetry), restore (`restore_start` to
  `restore_end`), first_step (DDP's bucket settling and the step itself, to `first_step`). This is the
  restart time a preemption costs before training goes on; the startup category is its part before the
  first step began, less the restore.
- restarts: rank-0 incarnations after the first; world_sizes: theirs (`process_start`), in order of
  first appearance; preemptions: rank-0 incarnations that logged a `preemption_notice` (the loop logs
  it on rank 0 once the ranks agree to stop). These are the job's one source of those facts
  (summary.json included): every incarnation is here from its start, while a checkpoint knows only
  the incarnations that lived to commit one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.telemetry import events as ev

PRODUCTIVE = "productive"
STARTUP = "startup"
RESTORE = "restore"
CHECKPOINT = "checkpoint"
LOST = "lost"
DOWNTIME = "downtime"
OTHER = "other"
CATEGORIES = (PRODUCTIVE, STARTUP, RESTORE, CHECKPOINT, LOST, DOWNTIME, OTHER)
# Highest first; an instant covered by none of these is `other` while alive, else `downtime`.
_PRIORITY = (CHECKPOINT, RESTORE, LOST, PRODUCTIVE, STARTUP, OTHER)
PHASES = ("launch", "imports", "rendezvous", "build", "restore", "first_step")


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    category: str


@dataclass(frozen=True)
class Life:
    """One incarnation's alive span."""

    incarnation: str
    rank: int
    node: str
    start: float
    end: float
    exit_code: int | None


@dataclass(frozen=True)
class Startup:
    """One rank-0 incarnation's way from its launch to its first completed step: seconds per phase
    (PHASES; `launch` is absent when no launcher or agent told when it started the process)."""

    incarnation: str
    restored_step: int | None  # None: it started from scratch
    phases: dict[str, float]

    @property
    def total_s(self) -> float:
        return sum(self.phases.values())


@dataclass(frozen=True)
class Breakdown:
    start: float
    end: float
    seconds: dict[str, float]
    segments: tuple[Segment, ...] = ()
    lives: tuple[Life, ...] = ()
    notices: tuple[float, ...] = ()  # preemption notice times, any rank
    preemptions: int = 0
    restarts: int = 0
    world_sizes: tuple[int, ...] = ()
    finished: bool = False  # the latest rank-0 incarnation exited 0: total ends at the last event
    last_step: int | None = None
    productive_steps: int = 0
    lost_steps: int = 0
    telemetry_errors: int = 0  # sink and ledger failures recorded in the ledger
    job_info: dict[str, Any] = field(default_factory=dict)  # the job_start event's fields
    startups: tuple[Startup, ...] = ()  # rank-0 incarnations that completed a step, oldest first

    @property
    def total_s(self) -> float:
        return self.end - self.start

    @property
    def goodput(self) -> float:
        return self.seconds[PRODUCTIVE] / self.total_s if self.total_s > 0 else 0.0

    @property
    def running_s(self) -> float:
        """Time with some process of the job alive: the machine time that was paid for."""
        return self.total_s - self.seconds[DOWNTIME]

    def metrics(self) -> dict[str, float]:
        """Flat job metrics for the sinks."""
        out: dict[str, float] = {"goodput": self.goodput, "total_s": self.total_s}
        for c in CATEGORIES:
            out[f"seconds/{c}"] = self.seconds[c]
            if c != PRODUCTIVE:
                out[f"badput/{c}"] = self.seconds[c] / self.total_s if self.total_s > 0 else 0.0
        out.update(preemptions=self.preemptions, restarts=self.restarts, productive_steps=self.productive_steps,
                   lost_steps=self.lost_steps, telemetry_errors=self.telemetry_errors)
        if self.startups:  # the latest start's split: what the last restart cost
            latest = self.startups[-1]
            out.update({f"start_seconds/{p}": s for p, s in latest.phases.items()})
            out["start_seconds/total"] = latest.total_s
        return out


def breakdown(events: Iterable[dict[str, Any]], now: float | None = None) -> Breakdown:
    """The job's breakdown up to `now` (see the module docstring), or to its end once it finished."""
    evs = sorted(events, key=lambda e: e["t"])
    if not evs:
        return Breakdown(0.0, 0.0, dict.fromkeys(CATEGORIES, 0.0))
    lives = _lives(evs)
    job_lives = [life for life in lives if life.rank == 0]
    finished = bool(job_lives) and job_lives[-1].exit_code == 0
    launched = {e["incarnation"]: float(e["launched"]) for e in evs
                if e["kind"] == ev.PROCESS_START and "launched" in e}
    start, end = min([evs[0]["t"], *launched.values()]), evs[-1]["t"]
    if now is not None and not finished:
        end = max(end, now)
    job = [e for e in evs if e.get("rank") == 0]
    steps = [e for e in job if e["kind"] == ev.STEPS]
    lost_by_event = _lost_steps(steps)

    intervals: list[tuple[float, float, str]] = [(life.start, life.end, OTHER) for life in lives]
    for e in job:
        if e["kind"] in (ev.CKPT_BLOCK, ev.EMERGENCY_SAVE):
            intervals.append((e["t"] - float(e.get("seconds", 0.0)), e["t"], CHECKPOINT))
    for s in steps:
        n, lost, sec = s["last"] - s["first"] + 1, lost_by_event[id(s)], float(s["seconds"])
        split = s["t"] - sec * lost / n
        intervals += [(s["t"] - sec, split, PRODUCTIVE), (split, s["t"], LOST)]
    job_by_inc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in job:
        job_by_inc[e.get("incarnation", "?")].append(e)
    for life in lives:
        if life.rank == 0:
            intervals += _startup_and_restore(life, job_by_inc[life.incarnation],
                                              launched.get(life.incarnation, life.start))
    startups = tuple(s for life in job_lives if (s := _startup(job_by_inc[life.incarnation])) is not None)

    segments = _sweep(intervals, start, end)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for seg in segments:
        seconds[seg.category] += seg.end - seg.start
    noticed = {e["incarnation"] for e in job if e["kind"] == ev.PREEMPTION_NOTICE}
    lost_total = sum(lost_by_event.values())
    done = sum(s["last"] - s["first"] + 1 for s in steps)
    first_job = next((e for e in evs if e["kind"] == ev.JOB_START), {})
    return Breakdown(
        start=start, end=end, seconds=seconds, segments=tuple(segments), lives=tuple(lives),
        notices=tuple(e["t"] for e in evs if e["kind"] == ev.PREEMPTION_NOTICE),
        preemptions=len(noticed), restarts=max(0, len(job_lives) - 1),
        world_sizes=tuple(dict.fromkeys(int(e["world_size"]) for e in job
                                        if e["kind"] == ev.PROCESS_START and "world_size" in e)),
        finished=finished,
        last_step=max((s["last"] for s in steps), default=None),
        productive_steps=done - lost_total, lost_steps=lost_total,
        telemetry_errors=sum(e["kind"] == ev.TELEMETRY_ERROR for e in evs),
        job_info={k: v for k, v in first_job.items() if k not in ("t", "kind", "incarnation", "rank", "node")},
        startups=startups,
    )


def _lives(evs: list[dict[str, Any]]) -> list[Life]:
    by_inc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evs:
        by_inc[e.get("incarnation", "?")].append(e)
    out = []
    for inc, es in by_inc.items():
        exit_code = next((e.get("code") for e in reversed(es) if e["kind"] == ev.EXIT), None)
        out.append(Life(inc, int(es[0].get("rank", 0)), str(es[0].get("node", "")),
                        es[0]["t"], es[-1]["t"], exit_code))
    return sorted(out, key=lambda life: life.start)


def _lost_steps(steps: list[dict[str, Any]]) -> dict[int, int]:
    """For each `steps` event (by id), how many of its steps were completed again later."""
    later: list[tuple[int, int]] = []  # disjoint, merged ranges completed after the current event
    out: dict[int, int] = {}
    for s in reversed(steps):
        first, last = s["first"], s["last"]
        out[id(s)] = sum(max(0, min(last, b) - max(first, a) + 1) for a, b in later)
        later = _merge(later + [(first, last)])
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _startup(es: list[dict[str, Any]]) -> Startup | None:
    """The split of one rank-0 incarnation's start; None until its first step, or when its events lack
    the phases (a ledger written before they were recorded, the chaos baseline's trainer)."""
    first: dict[str, dict[str, Any]] = {}
    for e in es:
        first.setdefault(e["kind"], e)
    needed = (ev.PROCESS_START, ev.RENDEZVOUS_DONE, ev.RESTORE_START, ev.RESTORE_END, ev.FIRST_STEP)
    if any(k not in first for k in needed) or "seconds" not in first[ev.RENDEZVOUS_DONE]:
        return None
    process, rdzv = first[ev.PROCESS_START], first[ev.RENDEZVOUS_DONE]
    restore_start, restore_end = first[ev.RESTORE_START]["t"], first[ev.RESTORE_END]["t"]
    rdzv_start = rdzv["t"] - float(rdzv["seconds"])
    phases = {"launch": process["t"] - float(process["launched"])} if "launched" in process else {}
    phases.update(imports=rdzv_start - process["t"], rendezvous=float(rdzv["seconds"]),
                  build=restore_start - rdzv["t"], restore=restore_end - restore_start,
                  first_step=first[ev.FIRST_STEP]["t"] - restore_end)
    restored = first[ev.RESTORE_END]
    return Startup(process["incarnation"], restored.get("step") if restored.get("tier") else None, phases)


def _startup_and_restore(life: Life, es: list[dict[str, Any]], launched: float) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    first_step = next((e["t"] - float(e["seconds"]) for e in es if e["kind"] == ev.STEPS), None)
    if first_step is None:
        first_step = next((e["t"] for e in es if e["kind"] in (ev.PREEMPTION_NOTICE, ev.EXIT)), life.end)
    out.append((min(launched, life.start), first_step, STARTUP))
    opened: float | None = None
    for e in es:
        if e["kind"] == ev.RESTORE_START and opened is None:
            opened = e["t"]
        elif e["kind"] == ev.RESTORE_END and opened is not None:
            out.append((opened, e["t"], RESTORE))
            opened = None
    if opened is not None:
        out.append((opened, life.end, RESTORE))
    return out


def _sweep(intervals: list[tuple[float, float, str]], start: float, end: float) -> list[Segment]:
    """Label every instant of [start, end] by the highest-priority interval covering it."""
    edges: list[tuple[float, int, str]] = []
    for a, b, cat in intervals:
        a, b = max(a, start), min(b, end)
        if b > a:
            edges += [(a, 1, cat), (b, -1, cat)]
    edges.sort(key=lambda x: x[0])
    active = dict.fromkeys(_PRIORITY, 0)
    out: list[Segment] = []
    now, i = start, 0
    while now < end:
        while i < len(edges) and edges[i][0] <= now:
            active[edges[i][2]] += edges[i][1]
            i += 1
        nxt = edges[i][0] if i < len(edges) else end
        cat = next((c for c in _PRIORITY if active[c] > 0), DOWNTIME)
        if out and out[-1].category == cat and out[-1].end == now:
            out[-1] = Segment(out[-1].start, nxt, cat)
        else:
            out.append(Segment(now, nxt, cat))
        now = nxt
    return out
