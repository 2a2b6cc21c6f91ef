"""`chaos_report.json` and `chaos_timeline.png`: what a chaos run cost and whether the model came out exact.

Two views of where the time went:
- `observer`: computed by the cloud from what it saw, for any trainer (the guides' baseline keeps no
  ledger). The job's wall time runs from the first training VM's first boot to the summary. Rank 0's step
  completions split it into productive (time stepping, for steps kept) · lost (time stepping, for
  steps computed again later) · checkpoint (pauses within one process beyond twice the median step:
  blocking saves) · restart (from one trainer process's last step to the next one's first: notice,
  VM recreate, boot, rendezvous, restore) · startup (before the first step) · shutdown (after the
  last) · other (what rounding leaves; about zero).
- `ledger`: the job's own goodput ledger (harness/telemetry), when the trainer keeps one in the bucket.
`goodput` is the ledger's when there is one, else the observer's.
`topology` and `vms` show the deployment that ran (one entry per VM: role, provisioning, boots,
preemptions, autoheals, its unit's exit codes), `groups` each instance group's size at the start and
at the end (the job's end resizes them to 0), `after_end` the VM booted after the end (with
`chaos.boot_after_end`), `monitoring_series` the time series the job wrote to the local Cloud
Monitoring server, `differences_from_deploy` what the local cloud changed in the deployment.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness.chaos.audit import StepDone
from harness.chaos.cloud import Outcome
from harness.chaos.differences import Difference
from harness.telemetry.breakdown import breakdown
from infra.settings import Settings
from infra.vm import groups

CATEGORIES = ("productive", "lost", "checkpoint", "restart", "startup", "shutdown", "other")
COLORS = {"productive": "#2e7d32", "lost": "#c62828", "checkpoint": "#f9a825", "restart": "#6a1b9a",
          "startup": "#1565c0", "shutdown": "#78909c", "other": "#bdbdbd",
          "restore": "#00838f", "downtime": "#6a1b9a"}  # the last two: the ledger's categories


def observed_breakdown(outcome: Outcome) -> dict[str, Any]:
    """The observer's goodput breakdown (see the module docstring). Every second between the job's start
    and its summary lands in exactly one category."""
    steps = outcome.audit.rank0()
    end = next((e.t for e in outcome.events if e.kind == "finished"), outcome.end)
    total = end - outcome.start
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    if not steps:
        seconds["startup"] = total
        return {"goodput": 0.0, "total_s": total, "step_s": None, "seconds": seconds, "restart_gaps_s": []}
    step_s = step_time(steps)
    stepping, gaps = step_s, []  # the first step's own duration is not seen: the median stands in
    for a, b in zip(steps, steps[1:], strict=False):
        gap = b.t - a.t
        if a.source == b.source:  # a gap of one process: its step, plus any pause beyond twice the median
            stepping += min(gap, 2 * step_s)
            seconds["checkpoint"] += max(0.0, gap - 2 * step_s)
        else:  # a new process: the restart, then its first step
            gaps.append(round(max(0.0, gap - step_s), 3))
            stepping += min(gap, step_s)
    seconds["restart"] = sum(gaps)
    lost = outcome.audit.lost_steps()
    seconds["lost"] = stepping * lost / len(steps)
    seconds["productive"] = stepping - seconds["lost"]
    seconds["startup"] = max(0.0, steps[0].t - step_s - outcome.start)
    seconds["shutdown"] = max(0.0, end - steps[-1].t)
    seconds["other"] = total - sum(seconds.values())
    return {"goodput": seconds["productive"] / total if total > 0 else 0.0, "total_s": total, "step_s": step_s,
            "seconds": seconds, "restart_gaps_s": gaps}


def step_time(steps: list[StepDone], window: int = 10) -> float:
    """The uninterrupted step time: the median over windows of `window` consecutive steps of one process
    (a window smooths the polling jitter of single gaps; the median ignores windows with a pause)."""
    by_source: dict[str, list[float]] = {}
    for s in steps:
        by_source.setdefault(s.source, []).append(s.t)
    rates = [(times[i + window] - times[i]) / window
             for times in by_source.values() for i in range(0, len(times) - window, window)]
    if not rates:
        rates = [b - a for times in by_source.values() for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(rates) if rates else 0.0


def ledger_breakdown(events: list[dict[str, Any]], end: float) -> dict[str, Any] | None:
    """The ledger's breakdown up to the local cloud's end: a job that stopped training shows a goodput
    that falls with the time no trainer was alive, as the observer's does."""
    if not events:
        return None
    b = breakdown(events, now=end)
    return {"goodput": b.goodput, "total_s": b.total_s, "seconds": dict(b.seconds), "preemptions": b.preemptions,
            "restarts": b.restarts, "lost_steps": b.lost_steps, "productive_steps": b.productive_steps}


def topology(settings: Settings, outcome: Outcome) -> dict[str, Any]:
    """The topology group's name and shape: each group of VMs with its role, provisioning and size."""
    shape = [{"role": g.role, "provisioning": "SPOT" if g.spot else "STANDARD", "size": g.size,
              "machine_type": g.node.machine_type} for g in groups(settings)]
    lo, hi = settings.trainer_nodes()
    return {"name": settings.topology.name, "groups": shape, "spot_workers": sum(g["size"] for g in shape
                                                                                 if g["provisioning"] == "SPOT"),
            "trainer_nodes": f"{lo}:{hi}", "world_size": outcome.world_size}


def build(outcome: Outcome, chaos, settings: Settings, found: list[Difference],
          reference_sha: str | None) -> dict[str, Any]:
    observer = observed_breakdown(outcome)
    ledger = ledger_breakdown(outcome.ledger, outcome.end)
    summary = outcome.summary or {}
    kinds = [e.kind for e in outcome.events]
    sha = summary.get("model_sha256")
    constant_world = summary.get("world_sizes") == [outcome.world_size]
    primary = ledger or observer
    return {
        "finished": outcome.finished,
        "trainer": chaos.trainer,
        "topology": topology(settings, outcome),
        "vms": outcome.vms,
        "groups": outcome.groups,
        "after_end": outcome.after_end,
        "monitoring_series": outcome.monitoring_series,
        "autoheals": kinds.count("autoheal"),
        "differences_from_deploy": [d.as_dict() for d in found],
        "schedule": {"mtbi_s_per_vm": chaos.mtbi_s, "seed": chaos.seed, "notice_s": chaos.notice_s,
                     "recreate_s": chaos.recreate_s, "explicit": bool(chaos.get("preemptions")),
                     "planned": [{"at_s": p.at_s, "vm": p.vm, **({"phase": p.phase} if p.phase else {})}
                                 for p in outcome.schedule],
                     "clock_starts_at_s": None if outcome.clock is None else round(outcome.clock - outcome.start, 3)},
        "wall_s": round(outcome.end - outcome.start, 3),
        "preemptions": kinds.count("preempt"),
        "missed_preemptions": kinds.count("missed"),
        "recreates": kinds.count("recreate"),
        "restarts": max(0, len({s.source for s in outcome.audit.rank0()}) - 1),
        "lost_steps": outcome.audit.lost_steps(),
        "repeated_samples": outcome.audit.repeated_samples(),
        "skipped_samples": outcome.audit.skipped_samples(int(summary.get("sample_index") or 0)),
        "final_step": summary.get("final_step"),
        "summary": outcome.summary,  # the job's summary.json (final_loss, cost, W&B run id): harness/sweep reads it
        "world_sizes": summary.get("world_sizes"),
        "model_sha256": sha,
        "reference_model_sha256": reference_sha,
        "exact": (sha == reference_sha) if (sha and reference_sha and constant_world) else None,
        "goodput": {"source": "ledger" if ledger else "observer", "goodput": primary["goodput"],
                    "seconds": primary["seconds"]},
        "observer": observer,
        "ledger": ledger,
        "events": [{"t_s": round(e.t - outcome.start, 3), "kind": e.kind, "vm": e.vm, "detail": e.detail}
                   for e in outcome.events],
        "logs": str(outcome.logs),
    }


def write(report: dict[str, Any], outcome: Outcome, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "chaos_report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = out / "chaos_timeline.png"
    plot(report, outcome, png_path)
    return json_path, png_path


def _vm_spans(report: dict[str, Any], end_s: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per VM: (start, end, state) spans from the event list."""
    state_of = {"boot": "booting", "recreate": "booting", "up": "up", "preempt": "notice", "off": "down",
                "deleted": "down"}
    spans: dict[str, list[tuple[float, float, str]]] = {}
    current: dict[str, tuple[float, str]] = {}
    for e in report["events"]:
        if e["kind"] not in state_of:
            continue
        vm, t = e["vm"], e["t_s"]
        if vm in current:
            spans.setdefault(vm, []).append((current[vm][0], t, current[vm][1]))
        current[vm] = (t, state_of[e["kind"]])
    for vm, (t, state) in current.items():
        spans.setdefault(vm, []).append((t, end_s, state))
    return spans


def plot(report: dict[str, Any], outcome: Outcome, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end_s = report["wall_s"]
    fig, (ax_vm, ax_step, ax_bar) = plt.subplots(3, 1, figsize=(12, 7.5), height_ratios=[1.3, 2, 0.6])
    spans = _vm_spans(report, end_s)
    colors = {"booting": "#90caf9", "up": "#a5d6a7", "notice": "#ffcc80", "down": "#ef9a9a"}
    names = sorted(spans, key=lambda n: (n.startswith("worker"), n))
    for row, vm in enumerate(names):
        for a, b, state in spans[vm]:
            ax_vm.barh(row, b - a, left=a, color=colors[state], edgecolor="none")
    for e in report["events"]:
        if e["kind"] == "preempt":
            ax_vm.plot(e["t_s"], names.index(e["vm"]), marker="v", color="#c62828", markersize=9)
    ax_vm.set_yticks(range(len(names)), names)
    left = min(0.0, *(e["t_s"] for e in report["events"]))
    ax_vm.set_xlim(left, end_s)
    ax_vm.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
                 loc="upper right", ncol=4, fontsize=8)
    ax_vm.set_title(f"{report['trainer']}: goodput {report['goodput']['goodput']:.3f} ({report['goodput']['source']}), "
                    f"{report['preemptions']} preemptions, {report['recreates']} recreates, "
                    f"lost steps {report['lost_steps']}, exact {report['exact']}")
    by_source: dict[str, list[StepDone]] = {}
    for r in outcome.audit.rank0():
        by_source.setdefault(r.source, []).append(r)
    for source, recs in by_source.items():
        ax_step.plot([r.t - outcome.start for r in recs], [r.step + 1 for r in recs], lw=1.5, label=source)
    for e in report["events"]:
        if e["kind"] == "preempt":
            ax_step.axvline(e["t_s"], color="#c62828", lw=0.8, ls="--")
    ax_step.set_xlim(left, end_s)
    ax_step.set_ylabel("step (rank 0)")
    ax_step.set_xlabel("seconds since the first training VM's first boot")
    if len(by_source) <= 12:
        ax_step.legend(fontsize=7, loc="upper left")
    seconds = report["goodput"]["seconds"]
    total = sum(max(0.0, v) for v in seconds.values()) or 1.0
    left = 0.0
    for cat, value in seconds.items():
        share = max(0.0, value) / total
        ax_bar.barh(0, share, left=left, color=COLORS.get(cat, "#9e9e9e"), label=f"{cat} {share:.1%}")
        left += share
    ax_bar.set_xlim(0, 1)
    ax_bar.set_yticks([])
    ax_bar.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
