"""bench/gpu.sh's pieces on CPU: the checkpoint part runs against the current engine with the GPU machine's
missing packages blocked (no hydra, omegaconf or wandb there), the targets are marked as the issue defines
them, and the script is shellcheck-clean. The whole GPU script is rehearsed by `bench/gpu.sh --rehearse`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu import GB, targets_of
from bench.gpu_image import write_sitecustomize

REPO = Path(__file__).resolve().parent.parent


def image_env(tmp_path: Path) -> dict[str, str]:
    """This venv made to look like the GPU image plus the shipped google-crc32c wheel."""
    write_sitecustomize(tmp_path / "image", [], ["google_crc32c"])
    return {**os.environ, "PYTHONPATH": f"{tmp_path / 'image'}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}


def test_checkpoint_part_runs_without_hydra_omegaconf_wandb(tmp_path):
    env = image_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import omegaconf"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert blocked.returncode != 0 and "GPU machine's image" in blocked.stderr, blocked.stderr
    out = tmp_path / "checkpoint.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "checkpoint", "--out", str(out), "--device", "cpu", "--sizes", "0.005",
         "--width", "256", "--threads", "2", "--budget-s", "120", "--dir", str(tmp_path / "scratch"),
         "--mode", "rehearse"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["done"] and result["image_emulated"] and result["forbidden_imports"] == []
    (row,) = result["sizes"]
    assert "error" not in row and "skipped" not in row, row
    for key in ("b_first_pause_s", "b_pause_s", "c_commit_s", "e_floor_s", "f_raw_write_s", "d_restore_s",
                "emergency_s", "emergency_behind_inflight_s", "a_torch_save_s"):
        assert row[key] > 0, key
    assert row["emergency_ok"] and row["restore_exact"] and row["restored_step"] is not None
    for peer in ("dcp_default", "dcp_pinned"):
        assert row[peer]["available"] and row[peer]["calls"], row[peer]
        assert all("error" not in c and c["durable_s"] >= c["pause_s"] > 0 for c in row[peer]["calls"]), row[peer]
    assert not list((tmp_path / "scratch").iterdir()), "the part left files behind"


def test_targets_are_marked_met_missed_or_not_measured():
    def row(gb, **kw):
        return {"bytes": int(gb * GB), "gb": gb, **kw}

    marks = targets_of({"sizes": [
        row(1.0, b_pause_s=0.03, e_floor_s=0.02, c_commit_s=0.9, f_raw_write_s=0.6),
        {"target_gb": 6.0, "skipped": "does not fit"},
        row(15.0, b_pause_s=0.9, e_floor_s=0.3, emergency_s=12.5, c_first_commit_s=20.0),
    ]})
    by = {(m["target"], m["size_gb"]): m for m in marks}
    assert by[("pause <= 2x pinned floor", 1.0)]["status"] == "met"
    assert by[("durable <= 1.2x raw write", 1.0)]["status"] == "missed"
    assert by[("pause <= 2x pinned floor", 15.0)]["status"] == "missed"
    assert by[("durable <= 1.2x raw write", 15.0)]["status"] == "not measured"
    emergency = next(m for m in marks if m["target"].startswith("emergency"))
    assert emergency["status"] == "met" and abs(emergency["value"] - 15.0) < 1e-9  # 12.5 s x 18/15
    small = targets_of({"sizes": [row(0.3, emergency_s=0.5)]})
    assert small[-1]["status"] == "not measured"  # too far from 18 GB to extrapolate


def test_gpu_script_is_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), str(REPO / "bench" / "gpu.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
