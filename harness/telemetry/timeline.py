"""A picture of where a job's time went: the goodput categories along the wall clock, each process
incarnation's life with its exit code, and the preemption notices."""

from __future__ import annotations

from pathlib import Path

from harness.telemetry.breakdown import CATEGORIES, Breakdown

COLORS = {
    "productive": "#2ca02c", "startup": "#ffbf00", "restore": "#9467bd", "checkpoint": "#1f77b4",
    "lost": "#d62728", "downtime": "#7f7f7f", "other": "#c7c7c7",
}


def _scale(total_s: float) -> tuple[float, str]:
    if total_s >= 2 * 3600:
        return 3600.0, "hours"
    if total_s >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def plot_timeline(b: Breakdown, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    unit, unit_name = _scale(b.total_s)
    writers = sorted({(life.rank, life.node) for life in b.lives})
    rows = ["job"] + [f"rank {rank} @ {node}" if node else f"rank {rank}" for rank, node in writers]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * len(rows)))
    for cat in CATEGORIES:
        spans = [((s.start - b.start) / unit, (s.end - s.start) / unit) for s in b.segments if s.category == cat]
        if spans:
            ax.broken_barh(spans, (0.6, 0.8), facecolors=COLORS[cat])
    for life in b.lives:
        y = 1 + writers.index((life.rank, life.node))
        x0, width = (life.start - b.start) / unit, (life.end - life.start) / unit
        ax.broken_barh([(x0, width)], (y + 0.7, 0.6), facecolors="#9ecae1", edgecolors="#3182bd")
        if life.exit_code is not None:
            ax.annotate(f"exit {life.exit_code}", (x0 + width, y + 1), fontsize=7, va="center",
                        xytext=(2, 0), textcoords="offset points")
    for t in b.notices:
        ax.axvline((t - b.start) / unit, color="#d62728", linestyle="--", linewidth=1)
    ax.set_yticks([1 + i for i in range(len(rows))], rows)
    ax.set_ylim(0.4, len(rows) + 0.6)
    ax.invert_yaxis()
    ax.set_xlim(0, max(b.total_s / unit, 1e-9))
    ax.set_xlabel(f"{unit_name} since the job's first event")
    ax.set_title(f"goodput {b.goodput:.1%} over {b.total_s / unit:.2f} {unit_name}; "
                 f"{b.preemptions} preemptions, {b.restarts} restarts (red dashes: preemption notices)")
    handles = [Patch(color=COLORS[c], label=f"{c} {b.seconds[c] / b.total_s:.1%}" if b.total_s else c)
               for c in CATEGORIES]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.15),
              ncol=len(CATEGORIES), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
