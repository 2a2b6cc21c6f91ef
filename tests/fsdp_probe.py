"""Restore a run's newest checkpoint into a freshly built job and print the full weights' sha256.

    torchrun --nproc-per-node=W tests/fsdp_probe.py <job overrides...>

Run by tests/test_fsdp.py at several world sizes and both strategies against copies of one checkpoint:
what each load holds must be what was saved, however it is sharded.
"""

from __future__ import annotations

import sys

from harness import config, distributed
from harness.checkpoint.manager import CheckpointManager
from harness.state import TrainState, model_sha256
from harness.train import build


def main() -> None:
    cfg = config.load(sys.argv[1:])
    d = distributed.init("cpu")
    try:
        _, model, optimizer = build(cfg, d)
        state = TrainState(model, optimizer, d.rank, d.device)
        ckpt = CheckpointManager(config.checkpoint_config(cfg), d)
        restored = ckpt.restore(state)
        sha = model_sha256(model)
        ckpt.close()
        if d.is_main:
            print(f"probe: step {restored.step if restored else None} world {d.world_size} sha {sha}", flush=True)
    finally:
        distributed.shutdown(d)


if __name__ == "__main__":
    main()
