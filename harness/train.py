"""Entry point: `python -m harness.train [hydra overrides]`, alone or under torchrun.

The loop: restore the newest verified checkpoint, then at each step boundary all ranks agree (one
tiny collective, `Boundary`) on everything that changes what a collective does: a preemption notice
on any rank, a busy checkpoint writer, a stale-writer stop, and rank 0's cadence decision to save;
then take this step's global batch by sample index, accumulate gradients over micro-batches, clip,
step. On a notice: save within the deadline and exit with the "preempted" code.

Exit codes: 0 finished, 75 preempted (state durable: restart me), 2 bad config or a store another
writer owns, 69 a store that cannot be reached right now (restartable).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.distributed.elastic.multiprocessing.errors import record

from harness import config, distributed, job_end, parallel
from harness.batching import BatchPlan, BatchSplitError
from harness.cadence import Cadence
from harness.checkpoint.manager import CheckpointManager, CheckpointMismatch, NoUsableCheckpoint, TierUnavailable
from harness.checkpoint.manifest import CorruptCheckpoint
from harness.checkpoint.report import Kind
from harness.checkpoint.store import CommitConflict, StoreError
from harness.checkpoint.tiers import durable
from harness.data import make_batch, rank_indices
from harness.health import HEALTH_FILE_ENV, Bounds, Health, serve
from harness.models import logits_of
from harness.optim import build_optimizer, lr_at, set_lr
from harness.preemption import PREEMPTED_EXIT_CODE, NoticeBoard
from harness.preemption.gce_metadata import MetadataWatcher
from harness.preemption.notice import PREEMPTED_MARKER, REJOIN_MARKER
from harness.progress import ProgressDisplay
from harness.state import TrainState, capture_rng, model_sha256, restore_rng, seed_everything, unwrap
from harness.summary import write_summary
from harness.telemetry import events as ev
from harness.telemetry.ledger import ledger_location
from harness.telemetry.table import goodput_table
from harness.telemetry.telemetry import Telemetry

log = logging.getLogger("harness")
UNAVAILABLE_EXIT_CODE = 69  # EX_UNAVAILABLE: a store cannot be reached now; the unit restarts it


def _instantiate(node: DictConfig, **kwargs):
    """Hydra wraps what a constructor raises; a ConfigError (bad data or model input, named by its key)
    comes out as itself, so the job exits 2 with the message."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, config.ConfigError):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig, d: distributed.Dist):
    dataset = _instantiate(cfg.data, seed=cfg.seed)
    model = parallel.wrap(_instantiate(cfg.model).to(d.device), cfg.train, d)
    optimizer = build_optimizer(unwrap(model), cfg.optim)
    return dataset, model, optimizer


def never() -> bool:
    return False


@dataclass
class Stepper:
    """One optimizer step over this rank's share of the global batch, by global sample index: forward and
    backward per micro-batch (gradients reduced on the last), clip, learning rate, step. `abandon` is
    asked between micro-batches (preemption.in_flight_step=abandon: any rank holds a notice) and drops
    the step, RNG put back, so a save holds the last completed one."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: object
    plan: BatchPlan
    dist: distributed.Dist
    cfg: DictConfig
    autocast: AbstractContextManager
    audit: TextIO | None = None
    abandon: Callable[[], bool] = never

    def micro_loss(self, part: range) -> torch.Tensor:
        x, y = (t.to(self.dist.device) for t in make_batch(self.dataset, part))
        with self.autocast:
            logits = logits_of(self.model(x), x)
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def settle_gradient_buckets(self, state: TrainState) -> None:
        """DDP lays out its gradient buckets by parameter order for its first backward, then rebuilds them
        in the order the gradients became ready. gloo's ring all-reduce sums each element in an order that
        depends on that layout, which at 3 or more ranks changes the last bits. A restarted process would
        take its first step on the initial layout where the uninterrupted run had the rebuilt one: so each
        process first runs one throwaway backward (eval mode, RNG put back, gradients dropped), and every
        real step of every incarnation runs on the rebuilt layout."""
        if not parallel.is_ddp(self.model):
            return
        d, plan = self.dist, self.plan
        rng = capture_rng(d.device)
        self.model.eval()
        part = rank_indices(state.progress.sample_index, plan.global_batch, d.rank, d.world_size)[: plan.micro_batch]
        self.micro_loss(part).backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        restore_rng(rng, d.device)

    def step(self, state: TrainState) -> torch.Tensor | None:
        """The step at `state.progress`; None if abandoned. Returns its mean loss on this rank as a detached
        0-dim float64 tensor on the device, not yet read: `.item()` waits for the device, so the loop reads
        it only where it logs. float64 sums the micro-batch losses in the order and precision that Python
        floats did (the logged value is the same number)."""
        d, plan, progress = self.dist, self.plan, state.progress
        indices = rank_indices(progress.sample_index, plan.global_batch, d.rank, d.world_size)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for micro in range(plan.grad_accum):
            if micro and self.abandon():
                self.optimizer.zero_grad(set_to_none=True)
                state.rewind_to_step_boundary()
                return None
            part = indices[micro * plan.micro_batch : (micro + 1) * plan.micro_batch]
            with parallel.gradient_sync(self.model, micro == plan.grad_accum - 1):
                loss = self.micro_loss(part)
                (loss / plan.grad_accum).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        set_lr(self.optimizer, lr_at(progress.step, self.cfg.train.max_steps, self.cfg.optim, plan.lr_scale))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.audit:
            self.audit.write(f"{progress.step} {indices.start} {indices.stop}\n")
        progress.step += 1
        progress.sample_index += plan.global_batch
        return loss_sum / plan.grad_accum


def device_done(d: distributed.Dist) -> None:
    """Wait for the work queued on this rank's device (nothing to wait for on CPU). The loss stays on the
    device; only the step's end is observed."""
    if d.device.type == "cuda":
        torch.cuda.current_stream(d.device).synchronize()


def autocast_for(d: distributed.Dist) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()


@dataclass
class Job:
    """What the loop works with: the pieces built once per process."""

    cfg: DictConfig
    dist: distributed.Dist
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: object
    state: TrainState
    ckpt: CheckpointManager
    notices: NoticeBoard
    health: Health
    tel: Telemetry
    last_loss: float | None = None  # the last step's loss on rank 0's share (summary.json's final_loss)


def run(cfg: DictConfig) -> int:
    started = time.time()  # the imports are done: the start's `imports` phase ends, `rendezvous` begins
    d = distributed.init(cfg.train.device)
    rendezvous_done = time.time()
    notices = NoticeBoard(cfg.preemption.deadline_s)
    notices.install_signal_handlers(list(cfg.preemption.signals))
    watcher = MetadataWatcher(notices.record).start() if cfg.preemption.metadata_watch else None
    report_to = os.environ.get(HEALTH_FILE_ENV) if cfg.health.enabled and d.is_node_leader else None
    health = Health(Bounds.of(cfg.health), Path(report_to) if report_to else None)
    serving = cfg.health.enabled and d.is_node_leader and not report_to  # else the launcher serves it
    server = serve(health, cfg.health.port) if serving else None
    tel, code = None, 1
    try:
        seed_everything(cfg.seed, d.rank)
        dataset, model, optimizer = build(cfg, d)
        ckpt = CheckpointManager(config.checkpoint_config(cfg), d)
        tel = Telemetry.start(cfg, rank=d.rank, local_rank=d.local_rank, world_size=d.world_size,
                              node=f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', 0)}",
                              ledger_location=ledger_location(durable(ckpt.tiers).store.url))
        tel.event(ev.RENDEZVOUS_DONE, t=rendezvous_done, seconds=rendezvous_done - started, world_size=d.world_size)
        job = Job(cfg, d, model, optimizer, dataset, TrainState(model, optimizer, d.rank, d.device), ckpt,
                  notices, health, tel)
        restore(job)
        code = loop(job)
        health.set_phase("preempted" if code == PREEMPTED_EXIT_CODE else "finished")
        ckpt.close()
        if code == 0:
            sha = model_sha256(job.state.model)  # under FSDP every rank takes part in gathering the weights
            if d.is_main:
                finish(job, started, sha)
        return code
    finally:
        if tel:
            tel.close(code)
        if watcher:
            watcher.stop()
        if server:
            server.shutdown()
        distributed.shutdown(d)


def restore(job: Job) -> None:
    """Resume from the newest verified checkpoint, if any; clear the previous incarnation's marker."""
    job.health.set_phase("restoring")
    job.tel.event(ev.RESTORE_START)
    restored = job.ckpt.restore(job.state)
    progress = job.state.progress
    job.tel.event(ev.RESTORE_END, step=progress.step, tier=restored.tier if restored else None)
    if restored:
        log.info("resumed from step %d (%s tier, %.2fs) at world size %d", restored.step, restored.tier,
                 restored.seconds, job.dist.world_size)
    progress.wandb_run_id = progress.wandb_run_id or (job.tel.run_id or "")
    run_dir = Path(job.cfg.run.dir)
    if job.dist.is_node_leader:  # each node's markers are its own
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / REJOIN_MARKER).unlink(missing_ok=True)
    if job.dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(job.cfg))


@dataclass
class Boundary:
    """What every rank agreed at a step boundary: the maximum over ranks of a few numbers."""

    preempt: bool  # some rank holds a notice
    writer_busy: bool  # some rank's previous save is still being written
    stop: bool  # some rank learned that another writer owns the store
    save: bool  # rank 0's cadence says save now
    blocking_s: float  # the slowest rank's blocking time of the previous save (-1: none since)

    @classmethod
    def agree(cls, job: Job, save_due: bool, blocking_s: float) -> Boundary:
        preempt, busy, stop, save, blocking = distributed.max_over_ranks(
            job.dist, job.notices.pending, job.ckpt.busy, job.ckpt.conflict is not None, save_due, blocking_s)
        return cls(preempt > 0, busy > 0, stop > 0, save > 0, blocking)


def loop(job: Job) -> int:
    cfg, d, state = job.cfg, job.dist, job.state
    plan = BatchPlan.for_world(cfg.train, cfg.elastic, d.world_size)
    display = ProgressDisplay(cfg.train.max_steps, state.progress.step, enabled=d.is_main,
                              log_interval=cfg.train.log_interval)
    cadence = Cadence(cfg.checkpoint.interval_steps, cfg.train.max_steps, state.progress.step)
    rewindable = cfg.preemption.in_flight_step == "abandon" and plan.grad_accum > 1
    stepper = Stepper(job.model, job.optimizer, job.dataset, plan, d, cfg, autocast_for(d),
                      open_audit(cfg, d) if cfg.train.audit_samples else None,
                      abandon=(lambda: distributed.any_rank(d, job.notices.pending)[0]) if rewindable else never)
    tokens_per_step = plan.global_batch * cfg.data.block_size
    stepper.settle_gradient_buckets(state)
    job.health.set_phase("training")
    job.model.train()
    blocking_s, seconds = -1.0, 0.0
    while True:
        step = state.progress.step
        due = d.is_main and step != job.ckpt.last_committed and cadence.due(step)
        agreed = Boundary.agree(job, due, blocking_s)
        if agreed.stop:  # a newer incarnation owns the store: this one is stale and must not go on
            raise job.ckpt.conflict or CommitConflict(job.ckpt.first.url, step, job.ckpt.incarnation,
                                                      "reported by another rank")
        if agreed.preempt:
            return emergency_exit(job)
        if d.is_main and agreed.blocking_s >= 0 and (every := cadence.observe(agreed.blocking_s, seconds,
                                                                               job.tel.mtbi_s())):
            job.tel.event(ev.INTERVAL_CHANGE, interval_steps=every)
        blocking_s = -1.0
        if agreed.save:
            report = job.ckpt.save(step, state, skip=agreed.writer_busy and cfg.checkpoint.if_busy == "skip")
            job.tel.event(ev.CKPT_BLOCK, step=step, seconds=report.seconds, skipped=not report.ok,
                          snapshot_bytes=report.bytes)
            blocking_s = report.seconds if report.ok else -1.0
            cadence.saved(step)
        if step >= cfg.train.max_steps:
            break
        if rewindable:
            state.mark_step_boundary()
        t0 = time.perf_counter()
        loss = stepper.step(state)
        if loss is None:  # abandoned on a notice: the state (RNG included) is the last completed step
            continue
        device_done(d)  # the step's time is the device's: the agreement would wait for this work anyway
        step, seconds = state.progress.step, time.perf_counter() - t0
        job.ckpt.prepare(state)  # once per process: buffers allocated while the next steps train
        job.health.step_done(step)
        read = loss.item() if display.shows(step) else None  # the step's one device->host read, if any
        display.update(step, read, seconds)
        if read is not None:  # the last step is always read: summary.json's final_loss is its loss
            job.last_loss = read
        metrics = None
        if step % cfg.train.log_interval == 0:  # a step the display shows: `read` holds its loss
            metrics = {"loss": read, "lr": job.optimizer.param_groups[0]["lr"], "world_size": d.world_size,
                       "tokens_per_s": tokens_per_step / seconds}
        job.tel.on_step(step, seconds, metrics)
        for report in job.ckpt.drain_reports():
            if not report.ok:
                log.warning("checkpoint %s of step %d on %s failed: %s", report.kind, report.step, report.tier,
                            report.detail)
                if report.kind == Kind.COMMIT:
                    cadence.failed()
    display.close()
    return 0


def open_audit(cfg, d):
    """Line-buffered record of `step first_index stop_index` per completed step, one file per process."""
    folder = Path(cfg.run.dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank{d.rank}-{os.getpid()}.txt", "a", buffering=1)


def emergency_exit(job: Job) -> int:
    """All ranks agreed a notice is pending: save the last completed step within the deadline (every
    rank), then only the nodes holding a notice stop. Their leaders leave the PREEMPTED marker the
    shutdown script waits on (the tier on which the step is committed, `ok: false` when it is not
    durable); every other node's leader leaves REJOIN, and its launcher goes back to rendezvous."""
    d = job.dist
    job.health.set_phase("saving")
    notice, step = job.notices.notice, job.state.progress.step
    source = notice.source if notice else "another rank"
    log.warning("preemption notice (%s): emergency checkpoint at step %d", source, step)
    job.tel.event(ev.PREEMPTION_NOTICE, source=source, step=step)
    report = job.ckpt.save_now(step, job.state, max(1.0, job.notices.seconds_left()))  # collective
    job.tel.event(ev.EMERGENCY_SAVE, step=step, seconds=report.seconds, tier=report.tier, ok=report.ok)
    noticed: dict[str, str] = {}
    for node, kind in distributed.all_gather_object(d, (d.node, notice.kind if notice else None),
                                                    group=d.ckpt_group):
        if kind:
            noticed.setdefault(node, kind)
    if d.is_node_leader:
        stops = d.node in noticed
        record = {"step": report.step, "tier": report.tier, "seconds": round(report.seconds, 3), "source": source,
                  "ok": report.ok, "kind": noticed.get(d.node), "preempted_nodes": sorted(noticed)}
        run_dir = Path(job.cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / (PREEMPTED_MARKER if stops else REJOIN_MARKER)).write_text(json.dumps(record) + "\n")
        saved = (f"step {report.step} saved to {report.tier or 'no tier'} in {report.seconds:.2f}s "
                 f"({'durable' if report.ok else 'NOT durable'})")
        if stops:
            print(f"preempted: {saved}; exit {PREEMPTED_EXIT_CODE} (restart to resume)", flush=True)
        else:
            print(f"node {'/'.join(sorted(noticed))} preempted: {saved}; this node rejoins", flush=True)
    return PREEMPTED_EXIT_CODE


def finish(job: Job, started: float, sha: str) -> None:
    """Rank 0 at the end: summary.json, the goodput breakdown of the whole job so far, then the job's
    end (harness/job_end.py): the `finished` record and every instance group resized to 0."""
    progress = job.state.progress
    summary, breakdown = write_summary(Path(job.cfg.run.dir), job.tel, final_step=progress.step, model_sha256=sha,
                                       started=started, sample_index=progress.sample_index,
                                       wandb_run_id=progress.wandb_run_id, final_loss=job.last_loss)
    Console().print(goodput_table(breakdown))
    job_end.job_finished(job.ckpt.tiers, progress.step, summary["model_sha256"], final_loss=job.last_loss)


@record
def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", 0)
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(sys.argv[1:] if argv is None else argv)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except TierUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return UNAVAILABLE_EXIT_CODE
    except (config.ConfigError, BatchSplitError, StoreError, CheckpointMismatch, NoUsableCheckpoint,
            CorruptCheckpoint) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
