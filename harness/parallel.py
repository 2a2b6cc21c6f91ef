"""How the model is spread over the ranks: `train.parallelism=ddp|fsdp`.

- `ddp` (default): every rank holds the whole model and optimizer state; gradients are all-reduced.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each block is sharded on its own, then the
  root, so a rank holds 1/world size of the parameters, gradients and optimizer state, and gathers one
  block's parameters at a time. Blocks are the modules whose class name is in
  `train.fsdp.shard_modules`; empty (default) means every element of the model's `nn.ModuleList`s,
  which is each transformer block of our GPT (`blocks`) and of Hugging Face decoders
  (`model.layers`, `transformer.h`). On GPU a mixed-precision policy (`train.fsdp.param_dtype`,
  `train.fsdp.reduce_dtype`: bf16 compute, fp32 reductions by default); on CPU (gloo) full fp32.
- `train.activation_checkpointing`: each block's activations are recomputed in the backward pass
  (torch's checkpoint wrapper, which preserves the RNG, so dropout masks are the same), for either
  strategy.

The checkpoint state is the same for both: `torch.distributed.checkpoint.state_dict` gives the same
parameter names (DDP's `module.` prefix and the checkpoint wrapper's are dropped), plain tensors under
DDP and DTensor shards under FSDP, so a checkpoint of one strategy loads into the other, at any world
size (DCP reshards).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from harness.distributed import Dist


def blocks(model: nn.Module, shard_modules: list[str]) -> list[nn.Module]:
    """The modules sharded (and checkpointed) one by one, in model order."""
    if shard_modules:
        names = set(shard_modules)
        return [m for m in model.modules() if type(m).__name__ in names]
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


def _checkpoint_blocks(model: nn.Module, targets: list[nn.Module]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    wanted = {id(t) for t in targets}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                parent.register_module(name, checkpoint_wrapper(child))


def wrap(model: nn.Module, train_cfg: Any, d: Dist) -> nn.Module:
    """The model as the loop trains it: DDP or FSDP2 over the job's ranks (unchanged on one process)."""
    targets = blocks(model, list(train_cfg.fsdp.shard_modules))
    if train_cfg.activation_checkpointing:
        _checkpoint_blocks(model, targets)
        targets = blocks(model, []) if not train_cfg.fsdp.shard_modules else targets
    if train_cfg.parallelism == "fsdp" and d.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if d.device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=getattr(torch, train_cfg.fsdp.param_dtype),
                                          reduce_dtype=getattr(torch, train_cfg.fsdp.reduce_dtype))
        for block in targets:
            fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if d.enabled:
        return nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                   else None)
    return model


def gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Within gradient accumulation only the last micro-batch reduces gradients."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)
