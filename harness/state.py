"""What a training state is: model, optimizer, progress (step, global sample index, ...) and RNG.

The learning-rate schedule is a pure function of the step (harness/optim.py), so the step is its
whole state. `to_dcp` / `load_dcp_state` translate to and from the flat dict that
torch.distributed.checkpoint saves; `harness/checkpoint` decides where and how it is stored.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor


@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    sample_index: int = 0  # next global sample index to train on
    restarts: int = 0  # times this run resumed from a checkpoint
    world_sizes: list[int] = field(default_factory=list)
    wandb_run_id: str = ""


def capture_rng(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every generator's state as plain tensors (no pickle: a checkpoint must never be code). CUDA's
    generator is the rank's own device only: after a restart the same rank may sit on another GPU."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_extra": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    version, has_gauss_next, gauss_next = state["python_extra"].tolist()
    mt = tuple(int(v) for v in state["python_mt"].tolist())
    random.setstate((int(version), mt, gauss_next if has_gauss_next else None))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def json_tensor(obj: Any) -> torch.Tensor:
    """Plain JSON as a uint8 tensor: DCP stores it as a tensor, so loading it unpickles nothing."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.numpy().tobytes()).decode())


def seed_everything(seed: int, rank: int) -> None:
    """Seed every generator, distinct per rank, and ask torch for deterministic kernels."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    torch.use_deterministic_algorithms(True, warn_only=True)


class TrainState:
    """The full state a resume needs, in DCP's terms."""

    # Entries whose size changes between saves: restore allocates them at the saved size.
    VARIABLE_SIZE = ("progress",)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 device: torch.device | None = None):
        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.device = device
        self.progress = Progress()
        self._boundary_rng: dict[str, torch.Tensor] | None = None

    @property
    def rng_key(self) -> str:
        return f"rng_rank{self.rank}"

    def is_other_ranks(self, key: str) -> bool:
        """A checkpoint entry that belongs to another rank (its RNG): not this rank's to load."""
        head = key.split(".", 1)[0]
        return head.startswith("rng_rank") and head != self.rng_key

    def to_dcp(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "progress": json_tensor(asdict(self.progress)),
            self.rng_key: capture_rng(self.device),
        }

    def mark_step_boundary(self) -> None:
        """Remember the RNG at the start of a step, so a step abandoned half-way (in_flight_step=abandon)
        can put it back: the save then holds the boundary's RNG and the redone step draws the same masks."""
        self._boundary_rng = capture_rng(self.device)

    def rewind_to_step_boundary(self) -> None:
        if self._boundary_rng is not None:
            restore_rng(self._boundary_rng, self.device)

    def load_dcp_state(self, loaded: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        self.progress = Progress(**tensor_json(loaded["progress"]))
        if self.rng_key in loaded:
            restore_rng(loaded[self.rng_key], self.device)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_sha256(model: nn.Module) -> str:
    """SHA-256 over the full (unsharded) weights, whatever the strategy: the state dict's keys sorted,
    each tensor's raw contiguous CPU bytes. A sharded (FSDP) tensor is gathered one at a time, so no rank
    holds the whole model at once; every rank must call this then (the gathers are collectives)."""
    h = hashlib.sha256()
    sd = unwrap(model).state_dict()
    for key in sorted(sd):
        tensor = sd[key].detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        del tensor
    return h.hexdigest()
