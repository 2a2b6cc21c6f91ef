"""`summary.json`: what a finished run leaves in `run.dir`, written by one function for every trainer
(harness/train.py and the guides' baseline, harness/chaos/baseline.py), so tools read one shape.

Fields: `final_step`, `model_sha256` (harness/state.py: the full weights, whatever the strategy),
`wall_seconds` (this incarnation's), `world_sizes` (every world size the job trained at, in order),
`sample_index`, `wandb_run_id`, `lost_steps`, `final_loss` (the last step's loss on rank 0's share;
null when unknown), then the job's metrics: goodput, badput by category, `preemptions`, `restarts`,
cost, and the latest start's split (`start_seconds/<phase>`, `start_seconds/total`: its launch to its
first completed step). Restarts, world sizes, preemptions and lost steps come from the job's ledger, which has
every incarnation from its start (harness/telemetry/breakdown.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from harness.telemetry.breakdown import Breakdown
from harness.telemetry.telemetry import Telemetry

FILE = "summary.json"


def write_summary(run_dir: Path, tel: Telemetry, *, final_step: int, model_sha256: str, started: float,
                  sample_index: int, wandb_run_id: str = "", final_loss: float | None = None
                  ) -> tuple[dict[str, Any], Breakdown]:
    """Write `run_dir/summary.json` from the run's facts and its ledger; returns it and the breakdown."""
    tel.flush()
    breakdown = tel.breakdown()
    summary = {
        "final_step": final_step,
        "model_sha256": model_sha256,
        "wall_seconds": round(time.time() - started, 3),
        "world_sizes": list(breakdown.world_sizes),
        "sample_index": sample_index,
        "wandb_run_id": wandb_run_id,
        "lost_steps": breakdown.lost_steps,
        "final_loss": final_loss,
        **{k: round(v, 6) for k, v in tel.job_metrics().items()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary, breakdown
