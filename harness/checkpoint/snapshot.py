"""Copy a training state into host buffers that are allocated once and reused.

This copy is the only part of a periodic save the train loop waits for. Allocating (especially
pinned) host memory costs seconds per GB, so buffers live across saves and are reallocated only when
a tensor's shape or dtype changes. On GPU the buffers are pinned and the copies are asynchronous,
then one synchronize; on CPU the copy is a memcpy. A sharded tensor (DTensor, under FSDP) is copied as
its local shard only and handed to DCP as a DTensor of the same layout, so each rank holds and writes
1/world size of it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor


class Snapshotter:
    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.bytes = 0

    def _buffer_for(self, path: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
            self._buffers[path] = buf
        return buf

    def take(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state` whose tensors are the reusable host buffers. Valid until the next take()."""
        self.bytes = 0
        any_cuda = False

        def copy_tree(node: Any, path: str) -> Any:
            nonlocal any_cuda
            if isinstance(node, DTensor):
                local = copy_tree(node.to_local(), path)
                return DTensor(local, node._spec, requires_grad=False)  # torch's own CPU offload does the same
            if isinstance(node, torch.Tensor):
                buf = self._buffer_for(path, node)
                any_cuda |= node.is_cuda
                buf.copy_(node.detach(), non_blocking=node.is_cuda)
                self.bytes += buf.numel() * buf.element_size()
                return buf
            if isinstance(node, dict):
                return {k: copy_tree(v, f"{path}/{k}") for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(copy_tree(v, f"{path}/{i}") for i, v in enumerate(node))
            return copy.deepcopy(node)

        snap = copy_tree(state, "")
        if any_cuda:
            torch.cuda.current_stream().synchronize()
        return snap
