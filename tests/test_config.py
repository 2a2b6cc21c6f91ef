"""Config: bad input fails before anything runs, naming the key, and touches no existing run."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader

from harness import config
from tests import runs


def test_defaults_compose_and_carry_the_contract_keys():
    cfg = config.load([])
    assert cfg.run.dir == "runs/default"
    assert cfg.checkpoint.store == "runs/default/checkpoints"
    assert cfg.wandb.mode == "offline"
    assert cfg.model.vocab_size == cfg.data.vocab_size
    for key in ("seed", "train.max_steps", "train.global_batch_size", "train.grad_accum",
                "checkpoint.interval_steps", "wandb.project", "launch.nproc_per_node"):
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    # The local Spot cloud's settings are not the job's: the production tree carries no chaos group.
    assert "chaos" not in cfg and not (config.CONF_DIR / "chaos").exists()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("no_such_key=1", "no_such_key"),
        ("checkpoint.nope=1", "nope"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.log_interval=0", "train.log_interval"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("checkpoint.interval_steps=soon", "checkpoint.interval_steps"),
        ("preemption.in_flight_step=maybe", "preemption.in_flight_step"),
        ("cost.sorce=x", "sorce"),
        ("cost.gpu_hourly.nvidia-l4.spot=cheap", "cost.gpu_hourly.nvidia-l4.spot"),
        ("cost.machine_hourly.e2-standard-2.on_demand=-1", "cost.machine_hourly.e2-standard-2.on_demand"),
        ("+cost.machine_hourly.my-type.preemptible=1", "cost.machine_hourly.my-type.preemptible"),
    ],
)
def test_bad_override_names_the_key(override, names):
    with pytest.raises(config.ConfigError, match=names.replace(".", r"\.")):
        config.load([override])


def test_a_machine_type_missing_from_the_price_table_is_added_by_override():
    cfg = config.load(["+cost.machine_hourly.my-type={spot:0.5,on_demand:1.5}"])
    assert dict(cfg.cost.machine_hourly["my-type"]) == {"spot": 0.5, "on_demand": 1.5}


def tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", ["train.max_steps=abc", "no_such_key=1", "checkpoint.store=s3://bucket/x"])
def test_make_train_with_bad_args_fails_fast_and_leaves_the_run_untouched(tmp_path, bad):
    run_dir = tmp_path / "existing"
    (run_dir / "checkpoints" / "step_000000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000000010" / "manifest.json").write_text("{}")
    (run_dir / "summary.json").write_text('{"final_step": 10}')
    before = tree_digest(run_dir)
    proc = subprocess.run(["make", "-s", "train", f"ARGS=run.dir={run_dir} {bad}"], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=120, env=runs.env())
    assert proc.returncode != 0
    key = bad.split("=")[0].split(".")[-1] if "store" not in bad else "s3://bucket/x"
    assert key in proc.stderr, proc.stderr
    assert "torch.distributed.run" not in proc.stdout, "torchrun was started despite the bad config"
    assert tree_digest(run_dir) == before


def test_user_model_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "user"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.launch", "launch.nproc_per_node=1", f"run.dir={run_dir}",
         "model._target_=tests.user_model.BigramMLP", "train.max_steps=30", *runs.FAST],
        cwd=runs.REPO, capture_output=True, text=True, timeout=180, env=runs.env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = runs.summary(run_dir)
    assert summary["final_step"] == 30
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    saved = FileSystemReader(newest).read_metadata().state_dict_metadata
    assert "model.embed.weight" in saved and not any("blocks" in k for k in saved)
