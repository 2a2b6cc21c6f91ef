"""What a training state is: model, optimizer, progress (step, global sample index, ...) and RNG.

The learning-rate schedule is a pure function of the step (harness/optim.py), so the step is its
whole state. `to_dcp` / `load_dcp_state` translate to and from the flat dict that
torch.distributed.checkpoint saves; `harness/checkpoint` decides where and how it is stored.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    sample_index: int = 0  # next global sample index to train on
    restarts: int = 0  # times this run resumed from a checkpoint
    world_sizes: list[int] = field(default_factory=list)
    wandb_run_id: str = ""


def capture_rng() -> bytes:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return pickle.dumps(state)


def restore_rng(blob: bytes) -> None:
    state = pickle.loads(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    """Seed every generator, distinct per rank, and ask torch for deterministic kernels."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    torch.use_deterministic_algorithms(True, warn_only=True)


class TrainState:
    """The full state a resume needs, in DCP's terms."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int):
        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.progress = Progress()

    @property
    def rng_key(self) -> str:
        return f"rng_rank{self.rank}"

    def to_dcp(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "progress": json.dumps(asdict(self.progress)),
            self.rng_key: capture_rng(),
        }

    def load_dcp_state(self, loaded: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        self.progress = Progress(**json.loads(loaded["progress"]))
        if self.rng_key in loaded:
            restore_rng(loaded[self.rng_key])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_sha256(model: nn.Module) -> str:
    """SHA-256 over the model state dict: keys sorted, each tensor's raw contiguous CPU bytes."""
    h = hashlib.sha256()
    sd = unwrap(model).state_dict()
    for key in sorted(sd):
        h.update(sd[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
