"""How one global batch is split across ranks and micro-batches at a world size.

Every world size the elastic range allows gets a valid split: the global batch stays the same when
the world size divides it (rounded down, with the LR scaled per `elastic.lr_scaling`, when it does
not), each forward pass holds at most `train.micro_batch_size` samples, and gradient accumulation
takes up the rest. A configuration with no valid split for some allowed world size fails at launch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("harness")


class BatchSplitError(ValueError):
    """No valid split of the global batch at this world size; the message names the keys."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    grad_accum: int
    lr_scale: float = 1.0

    @classmethod
    def for_world(cls, train, elastic, world_size: int, *, quiet: bool = False) -> BatchPlan:
        """`train` and `elastic` are the config groups of the same names."""
        wanted = train.global_batch_size
        batch = (wanted // world_size) * world_size
        if batch == 0:
            raise BatchSplitError(
                f"train.global_batch_size={wanted} is smaller than world size {world_size}: every rank needs at "
                "least one sample; raise train.global_batch_size or lower launch.nnodes/launch.nproc_per_node")
        share = batch // world_size
        accum = _accumulation(share, train.micro_batch_size, train.grad_accum)
        scale = 1.0
        if batch != wanted:
            ratio = batch / wanted
            scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[elastic.lr_scaling]
            if not quiet:
                log.warning("train.global_batch_size=%d not divisible by world size %d: using %d, lr x%.3f "
                            "(elastic.lr_scaling=%s)", wanted, world_size, batch, scale, elastic.lr_scaling)
        if train.grad_accum and accum != train.grad_accum and not quiet:
            log.warning("train.grad_accum=%d does not divide %d samples per rank at world size %d: using %d",
                        train.grad_accum, share, world_size, accum)
        return cls(batch, share // accum, accum, scale)


def _accumulation(share: int, micro_batch_size: int, grad_accum: int | None) -> int:
    """The fewest micro-batches >= the requested count that split `share` evenly, each within
    `micro_batch_size` (0: no limit). Always exists: `share` micro-batches of one sample."""
    fewest = max(grad_accum or 1, math.ceil(share / micro_batch_size) if micro_batch_size else 1)
    return next(n for n in range(min(fewest, share), share + 1) if share % n == 0)


def max_nodes(launch) -> int:
    """The most nodes `launch.nnodes` ("N" or "MIN:MAX") allows."""
    low, _, high = str(launch.nnodes).partition(":")
    return int(high or low)


def elastic_world_sizes(launch) -> range:
    """Every world size the launch settings allow: nodes in `launch.nnodes` times `launch.nproc_per_node`."""
    low = int(str(launch.nnodes).partition(":")[0])
    return range(low * launch.nproc_per_node, max_nodes(launch) * launch.nproc_per_node + 1, launch.nproc_per_node)


def check_every_world_size(train, elastic, launch) -> None:
    """Fail at launch, naming the keys, if some allowed world size has no valid split."""
    for world_size in elastic_world_sizes(launch):
        BatchPlan.for_world(train, elastic, world_size, quiet=True)
