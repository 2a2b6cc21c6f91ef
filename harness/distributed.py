"""Process-group setup and the one tiny collective per step through which ranks agree.

Under torchrun the environment names rank and world; alone, the trainer runs as world size 1 with no
process group. The backend is nccl when CUDA is used, gloo otherwise. Checkpoint collectives run on a
separate gloo group so a background save never interleaves with the training collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    ckpt_group: Any | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        return self.local_rank == 0

    @property
    def node(self) -> str:
        """This node's index in the job (torchrun's GROUP_RANK)."""
        return os.environ.get("GROUP_RANK", "0")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init(device_setting: str, timeout_s: float = 300.0) -> Dist:
    device = pick_device(device_setting)
    if "RANK" not in os.environ:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    ckpt_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
        ckpt_group=ckpt_group,
    )


def max_over_ranks(d: Dist, *values: float) -> list[float]:
    """Each value's maximum over all ranks: one all-reduce of a few numbers (the step agreement)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(d: Dist, *flags: bool) -> list[bool]:
    """For each flag, whether any rank has it set."""
    return [v > 0 for v in max_over_ranks(d, *map(float, flags))]


def all_gather_object(d: Dist, obj: Any, group: Any = None) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(d: Dist, obj: Any, group: Any = None) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def shutdown(d: Dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
