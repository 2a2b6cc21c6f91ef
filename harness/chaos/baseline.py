"""The guides' trainer, the baseline of the goodput comparison: `launch.module=harness.chaos.baseline`.

What the reference guides do, run on the same VMs and schedule as the harness:
- rank 0 `torch.save`s model, optimizer and progress to the local SSD every `chaos.baseline.interval_steps`
  steps, synchronously (the other ranks wait for it at the next step's all-reduce);
- every `chaos.baseline.gcs_every`-th save is also uploaded to the bucket before training goes on;
- no notice handling: SIGTERM ends the process, whatever it was doing;
- on start: the newest checkpoint that survived on some rank's local disk, else the newest in the
  bucket; the rank holding it loads it and broadcasts it to the others.
Model, data, optimizer, learning-rate schedule and the step itself are the harness's (harness.train), so
its final model equals the harness's when it restarts from a checkpoint of the same step.
It prints `baseline: save|upload|restore ...` lines with their timings for the comparison.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from harness import config, distributed
from harness.batching import BatchPlan
from harness.checkpoint.gcs_store import GCSStore, parse_gs_url
from harness.state import Progress, TrainState, model_sha256, seed_everything, unwrap
from harness.summary import write_summary
from harness.telemetry import events as ev
from harness.telemetry.ledger import ledger_location
from harness.telemetry.telemetry import Telemetry
from harness.train import Stepper, autocast_for, build, open_audit

log = logging.getLogger("harness.baseline")


class Checkpoints:
    """`step_XXXXXXXXX.pt` files in a local folder, copied to `<bucket tier>/baseline/` every Nth save."""

    def __init__(self, cfg):
        self.local = Path(cfg.checkpoint.store) / "baseline"
        remote = [str(t.url) for t in cfg.checkpoint.slower_tiers if str(t.url).startswith("gs://")]
        self.remote = GCSStore(remote[-1]) if remote else None
        self.prefix = f"{parse_gs_url(remote[-1])[1]}/baseline/" if remote else ""
        self.keep = int(cfg.chaos.baseline.keep)
        self.upload_every = int(cfg.chaos.baseline.interval_steps) * int(cfg.chaos.baseline.gcs_every)

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:09d}.pt"

    def local_steps(self) -> list[int]:
        return sorted(int(p.stem[5:]) for p in self.local.glob("step_*.pt")) if self.local.is_dir() else []

    def remote_steps(self) -> list[int]:
        if self.remote is None:
            return []
        blobs = self.remote.client.list_blobs(self.remote.bucket, prefix=f"{self.prefix}step_")
        return sorted(int(Path(b.name).stem[5:]) for b in blobs if b.name.endswith(".pt"))

    def save(self, state: TrainState) -> None:
        """Rank 0: write, fsync, rename; then, every gcs_every-th interval, upload before returning."""
        step = state.progress.step
        t0 = time.perf_counter()
        self.local.mkdir(parents=True, exist_ok=True)
        payload = {"model": unwrap(state.model).state_dict(), "optim": state.optimizer.state_dict(),
                   "progress": asdict(state.progress)}
        tmp = self.local / f".{self.name(step)}.tmp"
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.local / self.name(step))
        for old in self.local_steps()[: -self.keep]:
            (self.local / self.name(old)).unlink(missing_ok=True)
        print(f"baseline: save step {step} local {time.perf_counter() - t0:.3f}s", flush=True)
        if self.remote is not None and step % self.upload_every == 0:
            t1 = time.perf_counter()
            self.remote.bucket.blob(self.prefix + self.name(step)).upload_from_filename(
                str(self.local / self.name(step)))
            print(f"baseline: upload step {step} gcs {time.perf_counter() - t1:.3f}s", flush=True)

    def restore(self, state: TrainState, d: distributed.Dist) -> None:
        """All ranks: agree on the newest surviving checkpoint, let its holder load and broadcast it."""
        t0 = time.perf_counter()
        newest_local = max(self.local_steps(), default=-1)
        newest_remote = max(self.remote_steps(), default=-1) if d.is_main else -1
        held = distributed.all_gather_object(d, (newest_local, newest_remote))
        best_local = max(h[0] for h in held)
        best_remote = max(h[1] for h in held)
        if best_local < 0 and best_remote < 0:
            return
        from_local = best_local >= best_remote
        owner = next(r for r, h in enumerate(held) if h[0] == best_local) if from_local else 0
        box: list = [None]
        if d.rank == owner:
            path = self.local / self.name(best_local)
            if not from_local:
                path = self.local / f".download-{best_remote}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                self.remote.bucket.blob(self.prefix + self.name(best_remote)).download_to_filename(str(path))
            box[0] = torch.load(path, map_location="cpu", weights_only=False)
        if d.enabled:
            dist.broadcast_object_list(box, src=owner, group=d.ckpt_group)
        payload = box[0]
        unwrap(state.model).load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optim"])
        state.progress = Progress(**payload["progress"])
        state.progress.restarts += 1
        if d.is_main:
            print(f"baseline: restore step {state.progress.step} from {'local' if from_local else 'gcs'} "
                  f"{time.perf_counter() - t0:.3f}s", flush=True)


def run(cfg) -> int:
    started = time.time()
    d = distributed.init(cfg.train.device)
    seed_everything(cfg.seed, d.rank)
    dataset, model, optimizer = build(cfg, d)
    state = TrainState(model, optimizer, d.rank)
    ckpt = Checkpoints(cfg)
    # The goodput ledger is instrumentation, not part of the guides' method: it lets the harness's goodput
    # tools measure this trainer the same way (it dies on SIGTERM unflushed: keep telemetry.ledger_flush_s short).
    durable = ckpt.remote.url if ckpt.remote is not None else str(cfg.checkpoint.store)
    tel = Telemetry.start(cfg, rank=d.rank, local_rank=d.local_rank, world_size=d.world_size,
                          node=f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', 0)}",
                          ledger_location=ledger_location(durable))
    tel.event(ev.RENDEZVOUS_DONE, world_size=d.world_size)
    tel.event(ev.RESTORE_START)
    ckpt.restore(state, d)
    tel.event(ev.RESTORE_END, step=state.progress.step)
    plan = BatchPlan.for_world(cfg.train, cfg.elastic, d.world_size)
    # The baseline installs no notice handler: its steps are never abandoned.
    stepper = Stepper(model, optimizer, dataset, plan, d, cfg, autocast_for(d),
                      open_audit(cfg, d) if cfg.train.audit_samples else None)
    interval = int(cfg.chaos.baseline.interval_steps)
    model.train()
    while state.progress.step < cfg.train.max_steps:
        t0 = time.perf_counter()
        stepper.step(state)
        tel.on_step(state.progress.step, time.perf_counter() - t0)
        if d.is_main and (state.progress.step % interval == 0 or state.progress.step == cfg.train.max_steps):
            t1 = time.perf_counter()
            ckpt.save(state)
            tel.event(ev.CKPT_BLOCK, step=state.progress.step, seconds=time.perf_counter() - t1)
    sha = model_sha256(model)
    if d.is_main:
        write_summary(Path(cfg.run.dir), tel, final_step=state.progress.step, model_sha256=sha, started=started,
                      sample_index=state.progress.sample_index)
    tel.close(0)
    distributed.shutdown(d)
    return 0


def main() -> int:
    rank = os.environ.get("RANK", 0)
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    return run(config.load(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
