"""Per-step cost of the preemption agreement and the emergency-save time, for the default model.

Run under torchrun (`make bench-preemption`). The agreement (one all-reduce of two ints per step) is
measured as it costs training: blocks of steps with and without it, alternated, compared by wall time
(the baseline in the same run); its back-to-back latency is reported too. `save_now` is timed as the
emergency path runs it. Writes bench/results/preemption.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from harness import config, distributed
from harness.batching import BatchPlan
from harness.checkpoint.manager import CheckpointManager
from harness.preemption import NoticeBoard
from harness.state import TrainState, seed_everything
from harness.train import Stepper, build

BLOCK = 30  # steps per block; blocks alternate with and without the agreement
ROUNDS = 3


def main() -> None:
    d = distributed.init("cpu")
    with tempfile.TemporaryDirectory() as mine:
        tmp = distributed.broadcast_object(d, mine)
        cfg = config.load([f"run.dir={tmp}/run", *sys.argv[1:]])
        seed_everything(cfg.seed, d.rank)
        dataset, model, optimizer = build(cfg, d)
        state = TrainState(model, optimizer, d.rank)
        ckpt = CheckpointManager(config.checkpoint_config(cfg), d)
        plan, notices = BatchPlan.for_world(cfg.train, cfg.elastic, d.world_size), NoticeBoard(25.0)
        stepper = Stepper(model, optimizer, dataset, plan, d, cfg, nullcontext())

        def block(agree: bool) -> float:
            distributed.any_rank(d, False)  # start together
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                if agree:
                    distributed.any_rank(d, notices.pending, ckpt.busy)
                stepper.step(state)
            return (time.perf_counter() - t0) / BLOCK

        block(False)  # warm-up: allocations, connections
        without, with_agreement = [], []
        for _ in range(ROUNDS):
            without.append(block(False))
            with_agreement.append(block(True))
        latencies = []
        for _ in range(200):
            t0 = time.perf_counter()
            distributed.any_rank(d, False, False)
            latencies.append(time.perf_counter() - t0)
        report = ckpt.save_now(state.progress.step, state, deadline_s=25.0)
        ckpt.close()
        if d.is_main:
            base, agreed = statistics.median(without), statistics.median(with_agreement)
            result = {
                "world_size": d.world_size, "model": dict(cfg.model), "steps_per_block": BLOCK, "rounds": ROUNDS,
                "step_s_without_agreement": base, "step_s_with_agreement": agreed,
                "agreement_overhead_fraction": (agreed - base) / base,
                "agreement_latency_s_median": statistics.median(latencies),
                "agreement_latency_fraction_of_step": statistics.median(latencies) / base,
                "emergency_save_s": report.seconds, "emergency_save_bytes": report.bytes,
                "emergency_tier": report.tier,
            }
            out = Path("bench/results/preemption.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
    distributed.shutdown(d)


if __name__ == "__main__":
    main()
