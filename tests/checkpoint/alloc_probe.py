"""One rank cannot get the host memory for its snapshot: that save fails on every rank, training (here,
the next save) goes on.

    torchrun --nproc-per-node=2 tests/alloc_probe.py STORE

Run by tests/checkpoint/test_checkpoint_buffers.py. Rank 1 lowers its own address-space limit (RLIMIT_AS, a real
allocation failure, no mock) before the save of a state whose buffers it has not allocated yet, then
lifts it for the next save. A small state saved first starts the writer's threads under no limit.
Each rank prints one line `probe: {...}` with what its saves reported.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from harness import distributed
from harness.checkpoint.manager import CheckpointManager
from harness.state import TrainState, model_sha256
from tests.checkpoint.test_checkpoint import ckpt_cfg


def state_of(width: int, d: distributed.Dist) -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return TrainState(model, opt, d.rank)


def commit_of(manager: CheckpointManager, step: int) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for r in manager.drain_reports():
            if r.kind == "commit" and r.step == step:
                return {"ok": r.ok, "detail": r.detail}
        time.sleep(0.01)
    raise TimeoutError(f"no commit report for step {step}")


def vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def main() -> None:
    d = distributed.init("cpu")
    manager = CheckpointManager(ckpt_cfg(Path(sys.argv[1])), d)
    small, big = state_of(64, d), state_of(2048, d)  # 200 MB of model + AdamW state
    out: dict = {}
    manager.save(1, small)
    out["warmup"] = commit_of(manager, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if d.rank == 1:
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (32 << 20), hard))
    report = manager.save(2, big)
    out["short_of_memory"] = {"save_ok": report.ok, "save_detail": report.detail, **commit_of(manager, 2)}
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    report = manager.save(3, big)
    out["after"] = {"save_ok": report.ok, **commit_of(manager, 3)}
    manager.close()
    out["sha"] = model_sha256(big.model)
    print("probe: " + json.dumps({"rank": d.rank, **out}), flush=True)
    distributed.shutdown(d)


if __name__ == "__main__":
    main()
