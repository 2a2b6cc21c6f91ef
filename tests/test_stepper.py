"""The step's loss stays on the device: no device->host read per micro-batch or per step, one read where
the loop logs, and the value read is the number the per-micro-batch `.item()` used to give."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from harness import config
from harness.batching import BatchPlan
from harness.data import make_batch, rank_indices
from harness.distributed import Dist
from harness.models import logits_of
from harness.state import TrainState, seed_everything
from harness.train import Stepper, build
from tests import runs

# 16 samples in micro-batches of 4: 4 micro-batches per step in one process.
TINY = ["model.n_layer=1", "model.n_embd=32", "train.global_batch_size=16", "train.micro_batch_size=4",
        "train.max_steps=7"]


def stepper_on(device: torch.device, overrides: list[str]) -> tuple[Stepper, TrainState]:
    """What harness.train builds for one process, on `device`."""
    cfg = config.load([*TINY, *overrides])
    seed_everything(cfg.seed, 0)
    d = Dist(device=device)
    dataset, model, optimizer = build(cfg, d)
    model.train()
    plan = BatchPlan.for_world(cfg.train, cfg.elastic, 1)
    assert plan.grad_accum == 4
    return Stepper(model, optimizer, dataset, plan, d, cfg, nullcontext()), TrainState(model, optimizer, 0)


@pytest.fixture
def one_thread():
    """The trainer's processes run with OMP_NUM_THREADS=1 (harness.launch): same kernels, same bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_step_reads_nothing_from_the_device():
    """On the meta device a tensor holds no values: any read (`.item()`, `float()`, `.tolist()`, `.cpu()`)
    raises. So steps that complete there made no device->host read, and the loss comes back unread."""
    stepper, state = stepper_on(torch.device("meta"), [])
    for _ in range(3):
        loss = stepper.step(state)
        assert loss is not None and loss.device.type == "meta" and loss.dim() == 0
    assert state.progress.step == 3


def test_the_loss_read_is_the_mean_of_the_micro_batch_losses(one_thread):
    """Exactly what the per-micro-batch `.item()` gave: Python's float sum over micro-batches, then / 4."""
    stepper, state = stepper_on(torch.device("cpu"), [])
    for _ in range(2):
        plan = stepper.plan
        indices = rank_indices(state.progress.sample_index, plan.global_batch, 0, 1)
        micro = []
        for i in range(plan.grad_accum):
            x, y = make_batch(stepper.dataset, indices[i * plan.micro_batch : (i + 1) * plan.micro_batch])
            logits = logits_of(stepper.model(x), x)
            micro.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).item())
        loss = stepper.step(state)
        assert loss is not None and loss.item() == sum(micro) / plan.grad_accum


def test_the_trainer_logs_and_ends_with_losses_it_read(tmp_path, one_thread):
    """A real run whose last step (7) is not a log step (every 5): summary.json's final_loss is step 7's
    loss, read at the end, and the progress line of step 5 shows step 5's, against an in-process replay."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*TINY, f"run.dir={run_dir}"]
    proc = runs.start(0, overrides, log)
    stepper, state = stepper_on(torch.device("cpu"), [*runs.FAST, f"run.dir={tmp_path / 'replay'}"])
    losses = [stepper.step(state).item() for _ in range(7)]  # type: ignore[union-attr]
    assert runs.finish(proc, log) == 0, runs.tail(log)
    assert runs.summary(run_dir)["final_loss"] == losses[6]
    text = log.read_text()
    assert f"step 5/7 loss {losses[4]:.4f}" in text and f"step 7/7 loss {losses[6]:.4f}" in text
