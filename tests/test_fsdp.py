"""Sharded training (train.parallelism=fsdp, FSDP2 on CPU with gloo): one checkpoint holds what was
saved however it is loaded (world size 1, 2, 3; DDP or FSDP), and each rank snapshots and writes about
half of the state at world size 2, with either strategy. Exactness through kills is in test_exactness.py, world-size and
strategy changes mid-run in test_elastic.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests import runs

CONFIG = ["train.max_steps=30", "checkpoint.interval_steps=10", "model.n_embd=96", "model.n_layer=2"]


def sha_of_checkpoint(step_dir: Path, tmp: Path) -> str:
    """The full weights in a checkpoint's files, read in one process: the same function as model_sha256."""
    dcp_to_torch_save(step_dir, tmp / "full.pt")
    model = torch.load(tmp / "full.pt", weights_only=False)["model"]
    h = hashlib.sha256()
    for key in sorted(model):
        h.update(model[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def snapshot_bytes(run_dir: Path) -> int:
    """Rank 0's host snapshot of the last periodic save (the ledger's ckpt_block event)."""
    events = [json.loads(line) for f in (run_dir / "checkpoints" / "ledger").glob("*.jsonl")
              for line in f.read_text().splitlines()]
    return [e for e in events if e["kind"] == "ckpt_block"][-1]["snapshot_bytes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The same job trained at world size 2 with each strategy."""
    out = {}
    for parallelism in ("fsdp", "ddp"):
        run_dir = tmp_path_factory.mktemp(parallelism) / "run"
        log = run_dir.parent / "log.txt"
        assert runs.run(2, [*CONFIG, f"train.parallelism={parallelism}", f"run.dir={run_dir}"], log) == 0, \
            runs.tail(log)
        out[parallelism] = run_dir
    return out


def test_an_fsdp_checkpoint_loads_as_saved_at_any_world_size_and_into_ddp(trained, tmp_path):
    run_dir = trained["fsdp"]
    saved = runs.summary(run_dir)["model_sha256"]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert sha_of_checkpoint(newest, tmp_path) == saved, "the files hold the weights the run ended with"
    for nproc, parallelism in [(1, "ddp"), (2, "fsdp"), (3, "fsdp"), (2, "ddp")]:
        copy = tmp_path / f"{nproc}-{parallelism}"
        shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
        proc = runs.torchrun_script(nproc, runs.REPO / "tests" / "fsdp_probe.py",
                                    [*runs.FAST, *CONFIG, f"train.parallelism={parallelism}", f"run.dir={copy}"])
        assert f"probe: step 30 world {nproc} sha {saved}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_each_rank_snapshots_and_writes_about_half_of_the_state(trained, parallelism):
    """FSDP: each rank's shards; DDP: each replicated tensor is copied and written by one rank only."""
    newest = sorted((trained[parallelism] / "checkpoints").glob("step_*"))[-1]
    written = {rank: sum(f.stat().st_size for f in newest.glob(f"__{rank}_*.distcp")) for rank in (0, 1)}
    state = sum(written.values())
    assert 0.4 < snapshot_bytes(trained[parallelism]) / state < 0.6, (snapshot_bytes(trained[parallelism]), state)
    assert 0.4 < written[0] / state < 0.6, written
