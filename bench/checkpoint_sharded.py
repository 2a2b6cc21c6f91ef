"""The checkpoint benchmark's world-size-2 rows: DDP and FSDP at the same state size, per rank.

    torchrun --standalone --nproc-per-node=2 -m bench.checkpoint_sharded --gb 0.5 --parallelism fsdp

Run by `make bench-checkpoint` for both strategies (bench/checkpoint.py's `sharded` rows). The state is
bench/checkpoint.py's (stacked nn.Linear layers + AdamW state), wrapped as the trainer wraps a model
(harness/parallel.py: each layer sharded under FSDP, DDP otherwise). As the trainer does after its first
step, every rank calls CheckpointManager.prepare (where the engine has it: it decides each rank's share of
the state) and waits for its buffers; then the engine saves twice: the second save's pause, each rank's
snapshot bytes (issue 16's target: about 1/world size each), the bytes each rank wrote, and the time to
commit. Rank 0 prints one JSON line `sharded: {...}` that bench/checkpoint.py collects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from bench.checkpoint import GB, PEERS, dcp_peer, engine_config, layers_for, one_save, prepare
from harness import distributed, parallel
from harness.checkpoint.manager import CheckpointManager
from harness.state import TrainState

WIDTH = 1024


def build(gb: float, strategy: str, d: distributed.Dist) -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers_for(gb * GB, WIDTH))))
    train = SimpleNamespace(parallelism=strategy, activation_checkpointing=False,
                            fsdp=SimpleNamespace(shard_modules=[], param_dtype="bfloat16", reduce_dtype="float32"))
    model = parallel.wrap(model, train, d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return TrainState(model, opt, d.rank, d.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--parallelism", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    d = distributed.init("cpu")
    mine = args.dir or (tempfile.mkdtemp(prefix="bench-sharded-") if d.is_main else None)
    root = Path(distributed.all_gather_object(d, mine)[0])  # one store for the job, as on a node
    try:
        state = build(args.gb, args.parallelism, d)
        manager = CheckpointManager(engine_config(root / args.parallelism, write_threads=2, keep=2), d)
        prepared = prepare(manager, state)
        one_save(manager, state, 1)
        second = one_save(manager, state, 2)
        manager.close()
        step_dir = next((root / args.parallelism / "store").glob("step_*2"))
        written = sum(f.stat().st_size for f in step_dir.glob(f"__{d.rank}_*.distcp"))
        # the peers at the same world size: DCP stages every rank's whole state dict (replicated tensors too)
        peers = {kind: dcp_peer(kind, state, d.device, root / args.parallelism / "peers", 2, calls=3)
                 for kind in PEERS}
        peer_pause = {kind: peer["pause_s"] or peer["first_pause_s"] for kind, peer in peers.items()}
        rows = distributed.all_gather_object(d, {**second, "written_bytes": written, "prepared": prepared,
                                                 "peers": peer_pause})
        if d.is_main:
            total = sum(f.stat().st_size for f in step_dir.glob("__*.distcp"))
            print("sharded: " + json.dumps({
                "parallelism": args.parallelism, "world_size": d.world_size, "state_bytes": total,
                "prepare_per_rank": [r["prepared"] for r in rows],
                "pause_s": max(r["pause_s"] for r in rows), "commit_s": max(r["commit_s"] for r in rows),
                "peer_pause_s": {kind: max(r["peers"][kind] for r in rows) for kind in PEERS},
                "snapshot_bytes_per_rank": [r["snapshot_bytes"] for r in rows],
                "written_bytes_per_rank": [r["written_bytes"] for r in rows]}), flush=True)
        # gloo's group destructor joins its worker threads holding the GIL, and a worker still freeing a finished
        # all-gather's tensors needs the GIL (a hang seen at exit): the DDP reducer's reference goes while the
        # group is still registered, and a barrier lets every earlier work item go before the group does
        del state, manager
        torch.distributed.barrier()
        if d.is_main and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        distributed.shutdown(d)


if __name__ == "__main__":
    main()
