"""What each job of a sweep did, in one place: `<sweep.root>/<sweep>/sweep.json` and the printed table.

Contract of sweep.json (rewritten whole, atomically, whenever a job changes state):
    {"sweep", "on", "updated" (UTC ISO 8601), "dimensions" {key: [values]}, "common" [overrides],
     "parallel", "max_concurrent",
     "jobs": [{"index", "run_name", "overrides" (the job's command line: fixed and swept), "swept" {key: value},
               "status", "root_cause", "final_step", "max_steps", "loss", "model_sha256", "restarts",
               "preemptions", "goodput", "cost_usd", "wandb_run_id", "exact", "attempts", "exit_codes",
               "run_dir", "log", "durable"}]}
`status` is one of
- `pending`: never started (no ledger event);
- `running`: started and not finished, never interrupted; `resumed`: the same after a restart (a
  preemption, or a kill, then a resume from its newest checkpoint): "preempted and resumed". These are
  what the ledger shows: a job killed without a trace (SIGKILL, a VM lost with its disks) reads as
  running until a process of it exits or the next run of the sweep resumes it;
- `preempted`: stopped at a preemption notice (exit 75) and not running now: the next run of the sweep
  (locally) or its MIG's recreated VM (GCP) resumes it from its checkpoint;
- `finished`: its `finished` record reaches train.max_steps (`restarts` and `preemptions` then tell
  whether it was preempted and resumed on the way);
- `failed`: exited otherwise; `root_cause` says why (the trainer's or torchrun's error line).
Everything but the live process state comes from the job's durable tier, the same on this machine
and in the bucket: the `finished` record (final step, loss, model_sha256) and the goodput ledger
(harness/telemetry/breakdown.py: goodput, restarts, preemptions, cost from the prices the job recorded,
the W&B run id). `exact` is the local Spot cloud's verdict (chaos_report.json), else null.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import job_end
from harness.checkpoint.store import StoreError
from harness.checkpoint.tiers import open_store
from harness.cost import CostModel
from harness.sweep.jobs import Job, Sweep
from harness.telemetry.breakdown import PRODUCTIVE, breakdown
from harness.telemetry.ledger import ledger_location, read_ledger
from harness.telemetry.telemetry import run_id_of

STATUSES = ("pending", "running", "resumed", "preempted", "finished", "failed")
PREEMPTED = 75
FILE = "sweep.json"


@dataclass
class JobResult:
    index: int
    run_name: str
    overrides: list[str]
    swept: dict[str, str]
    status: str = "pending"
    root_cause: str | None = None
    final_step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    model_sha256: str | None = None
    restarts: int | None = None
    preemptions: int | None = None
    goodput: float | None = None
    cost_usd: float | None = None
    wandb_run_id: str | None = None
    exact: bool | None = None
    attempts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    run_dir: str | None = None
    log: str | None = None
    durable: str | None = None  # the job's durable checkpoint tier: its ledger and finished record

    @classmethod
    def of(cls, job: Job, max_steps: int | None, durable: str | None, run_dir: str | None) -> JobResult:
        return cls(job.index, job.run_name, list(job.overrides), dict(job.swept), max_steps=max_steps,
                   durable=durable, run_dir=run_dir)


def observe(result: JobResult, events: list[dict[str, Any]] | None = None, now: float | None = None) -> JobResult:
    """Fill `result` from the job's durable tier (`result.durable`): its finished record and ledger
    (or `events`, a ledger read elsewhere). Leaves the live state (`running`) to the caller."""
    done = None
    if result.durable:
        try:
            done = job_end.read(open_store(result.durable, retry_deadline_s=10.0))
        except StoreError as err:
            result.root_cause = result.root_cause or f"finished record unreadable: {err}"
        if events is None:
            try:
                events = read_ledger(ledger_location(result.durable))
            except Exception as err:  # noqa: BLE001 - an unreadable ledger shows as unknown figures
                result.root_cause = result.root_cause or f"ledger unreadable: {type(err).__name__}: {err}"
                events = []
    events = events or []
    if events:
        b = breakdown(events, now=time.time() if now is None else now)
        result.goodput, result.restarts, result.preemptions = round(b.goodput, 4), b.restarts, b.preemptions
        result.final_step = b.last_step
        result.wandb_run_id = run_id_of(events)
        info = b.job_info
        if "hourly_usd" in info:
            cost = CostModel(info["hourly_usd"], info["on_demand_hourly_usd"], info.get("price_source", ""),
                             info.get("price_as_of", ""))
            result.cost_usd = round(cost.metrics(b.running_s, b.seconds[PRODUCTIVE], b.productive_steps)["cost_usd"], 4)
        last = [life for life in b.lives if life.rank == 0][-1:] if b.lives else []
        exit_code = last[0].exit_code if last else None
        if exit_code == PREEMPTED:
            result.status = "preempted"
        elif exit_code not in (None, 0):
            result.status = "failed"
            result.root_cause = result.root_cause or f"rank 0 exited {exit_code} (ledger)"
        else:
            result.status = "resumed" if b.restarts else "running"
    if done is not None and (result.max_steps is None or done.step >= result.max_steps):
        result.status, result.root_cause = "finished", None
        result.final_step, result.model_sha256 = done.step, done.model_sha256
        result.loss = None if done.final_loss is None else round(done.final_loss, 4)
    elif not events:
        result.status = "pending"
    return result


def observe_chaos(result: JobResult, out: Path) -> JobResult:
    """A job run on the local Spot cloud: its bucket ended with the cloud, so what the job left is the
    cloud's `chaos_report.json` and the ledger copied beside it (`ledger.jsonl`)."""
    report_path = out / "chaos_report.json"
    if not report_path.is_file():
        result.status = "pending"
        return result
    report = json.loads(report_path.read_text())
    events = read_ledger(str(out))
    if events:
        result = observe(result, events)
    summary = report.get("summary") or {}
    result.final_step = report.get("final_step")
    result.model_sha256 = report.get("model_sha256")
    result.exact = report.get("exact")
    result.preemptions = report.get("preemptions")  # the cloud's count: notices it sent
    result.restarts = report.get("restarts", result.restarts)
    result.goodput = round(float(report["goodput"]["goodput"]), 4) if report.get("goodput") else result.goodput
    if summary.get("final_loss") is not None:
        result.loss = round(float(summary["final_loss"]), 4)
    if summary.get("cost_usd") is not None:
        result.cost_usd = round(float(summary["cost_usd"]), 4)
    result.wandb_run_id = summary.get("wandb_run_id") or result.wandb_run_id
    reached = result.max_steps is None or (result.final_step or 0) >= result.max_steps
    finished = bool(report.get("finished")) and reached
    if finished:
        result.status, result.root_cause = "finished", None
    else:
        result.status = "failed"
        timeout = next((e["detail"] for e in report.get("events", []) if e.get("kind") == "timeout"), None)
        result.root_cause = result.root_cause or timeout or "the job did not finish on the local Spot cloud"
    return result


# --- sweep.json and the table -----------------------------------------------------------------------

def document(sweep: Sweep, results: list[JobResult], on: str | None = None) -> dict[str, Any]:
    return {"sweep": sweep.name, "on": on or sweep.cfg.on,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dimensions": sweep.dimensions, "common": list(sweep.common), "parallel": sweep.cfg.parallel,
            "max_concurrent": sweep.cfg.max_concurrent, "jobs": [asdict(r) for r in results]}


def write(path: Path, doc: dict[str, Any]) -> Path:
    """Replace `path` whole (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(doc: dict[str, Any]):
    """The sweep as a rich Table: one row per job (its swept overrides), then the totals."""
    from rich.table import Table

    jobs = doc["jobs"]
    counts = {s: sum(j["status"] == s for j in jobs) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    out = Table(title=f"sweep {doc['sweep']} ({doc['on']}): {len(jobs)} jobs, {summary}",
                caption=f"{doc.get('updated', '')}; sweep.json has every job's full overrides and figures")
    chaos = doc["on"] == "chaos"
    for name, justify in (("#", "right"), ("overrides", "left"), ("status", "left"), ("step", "right"),
                          ("loss", "right"), ("restarts", "right"), ("preempted", "right"), ("goodput", "right"),
                          ("cost ($)", "right"), ("W&B run", "left"), *((("exact", "left"),) if chaos else ())):
        out.add_column(name, justify=justify)  # type: ignore[arg-type]
    for j in jobs:
        step = "-" if j["final_step"] is None else f"{j['final_step']}/{j['max_steps'] or '?'}"
        status = j["status"] if j["status"] != "failed" else f"failed: {j['root_cause'] or '?'}"
        row = [str(j["index"]), " ".join(f"{k}={v}" for k, v in j["swept"].items()) or "-", status, step,
               _num(j["loss"], ".4f"), _num(j["restarts"], "d"), _num(j["preemptions"], "d"),
               _num(j["goodput"], ".3f"), _num(j["cost_usd"], ".4f"), j["wandb_run_id"] or "-"]
        if chaos:
            row.append("-" if j["exact"] is None else str(j["exact"]).lower())
        out.add_row(*row)
    costs = [j["cost_usd"] for j in jobs if j["cost_usd"] is not None]
    if costs:
        out.add_section()
        out.add_row("", "total", "", "", "", "", "", "", f"{sum(costs):.4f}", "", *([""] if chaos else []))
    return out


def render(doc: dict[str, Any], width: int = 160) -> str:
    """The table as text (what `make sweep` prints)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table(doc))
    return console.export_text()
