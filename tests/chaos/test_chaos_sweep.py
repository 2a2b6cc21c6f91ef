"""A sweep on the local Spot cloud (`make sweep ARGS="... sweep.on=chaos"`): two jobs, each on its own
cloud (a coordinator and one Spot worker), each worker preempted once; both finish exact, and the table
shows their preemptions and goodput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import runs

# Each job: all_spot with one Spot worker (world size 1), 150 paced steps; the worker is preempted 3 s
# after the first step with a notice far longer than the emergency save, then recreated.
CHAOS_JOB = ["sweep.on=chaos", "sweep.parallel=2", "topology=all_spot", "topology.workers.min=1",
             "topology.workers.max=1", "train.max_steps=150", "chaos.preemptions=[{vm:0,at_s:3}]", "chaos.notice_s=6",
             "chaos.recreate_s=1", "chaos.max_duration_s=240"]


@pytest.mark.slow
def test_a_two_job_sweep_on_the_local_spot_cloud_ends_exact_with_its_preemptions_in_the_table(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "harness.sweep", f"sweep.root={tmp_path}", "sweep.name=chaos-abl",
                           *CHAOS_JOB, "optim.lr=1e-3,3e-3"], cwd=runs.REPO, env=runs.env(), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "chaos-abl" / "sweep.json").read_text())
    assert doc["on"] == "chaos"
    assert [j["run_name"] for j in doc["jobs"]] == ["chaos-abl/0-lr0.001", "chaos-abl/1-lr0.003"]
    for job in doc["jobs"]:
        report = json.loads((tmp_path / job["run_name"] / "chaos_report.json").read_text())
        context = json.dumps({k: report.get(k) for k in ("events", "vms", "goodput")}, indent=1)[-3000:]
        assert job["status"] == "finished" and job["final_step"] == 150, context
        assert job["exact"] is True and report["exact"] is True, context
        assert job["preemptions"] == report["preemptions"] == 1 and job["restarts"] >= 1, context
        assert 0 < job["goodput"] < 1 and job["goodput"] == pytest.approx(report["goodput"]["goodput"], abs=1e-4)
        assert job["cost_usd"] > 0 and job["loss"] > 0 and job["wandb_run_id"], job
        assert report["topology"]["name"] == "all_spot" and report["summary"]["final_step"] == 150
    assert doc["jobs"][0]["model_sha256"] != doc["jobs"][1]["model_sha256"], "two learning rates, two models"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ ") and "optim.lr=" in line]
    assert len(rows) == 2, proc.stdout[-3000:]
    for row, job in zip(rows, doc["jobs"], strict=True):
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert (cells[2], cells[6], cells[7], cells[-1]) == ("finished", "1", f"{job['goodput']:.3f}", "true")
