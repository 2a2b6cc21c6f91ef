"""Copy this rank's share of a training state into host buffers allocated once, ahead of need.

This copy is the only part of a periodic save the train loop waits for, so three things keep it at
one memcpy of 1/world size of the state:

- **Each rank copies its share only.** A tensor replicated on every rank (all of DDP's state; FSDP's
  scalar optimizer steps) is snapshotted and written by one rank, chosen by `share_out` (a balanced
  split by bytes, decided once by rank 0 for the job: `CheckpointManager.prepare`). DCP writes what
  each rank hands it and merges the plans, so the checkpoint still holds every tensor once. A sharded
  tensor (DTensor, under FSDP) is copied as its local shard and handed to DCP as a DTensor of the same
  layout. Before a share is decided (a save before the first step) every rank copies everything and
  DCP's own deduplication writes each replicated tensor once.
- **Buffers exist before the first save.** Allocating (on GPU, pinning) host memory costs seconds per
  GB: `allocate_in_background` fills them from a thread, touching every page, while training goes
  on. A save that comes first stops the thread after its current buffer, keeps what is ready and
  allocates the rest itself: never more than a save without it.
- **Buffers are reused.** They are reallocated only when a tensor's shape or dtype changes.

On GPU the copies are asynchronous into pinned buffers, then one synchronize; on CPU a memcpy. When
memory cannot be had, `take` raises SnapshotFailed: the engine turns it into a failed save.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger("harness.checkpoint")

REPLICATED_ROOTS = ("model", "optim")  # where plain (non-DTensor) tensors are the same on every rank


class SnapshotFailed(RuntimeError):
    """The host buffers for a snapshot could not be allocated: this save fails, training goes on."""


def tensors_of(state: Any, path: str = "", in_lists: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a state tree, DTensors as themselves, in a stable order
    (`in_lists=False`: only those reached through dicts, the ones a rank can leave out)."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors_of(v, f"{path}/{k}", in_lists)
    elif in_lists and isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors_of(v, f"{path}/{i}", in_lists)


def share_out(state: dict[str, Any], world_size: int) -> dict[str, int]:
    """Which rank snapshots each replicated tensor: largest first, to the rank with the fewest bytes so
    far (ties to the lowest rank), so every rank copies about 1/world size of the state."""
    replicated = [(t.numel() * t.element_size(), path) for path, t in tensors_of(state, in_lists=False)
                  if not isinstance(t, DTensor) and path.split("/")[1] in REPLICATED_ROOTS]
    loads, owner = [0] * world_size, {}
    for size, path in sorted(replicated, key=lambda sp: (-sp[0], sp[1])):
        rank = loads.index(min(loads))
        owner[path] = rank
        loads[rank] += size
    return owner


def _emptied(kept: Any, original: Any) -> bool:
    """A dict all of whose tensors another rank copies: left out whole (DCP would save it as empty)."""
    return isinstance(kept, dict) and not kept and bool(original)


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


class Snapshotter:
    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.owner: dict[str, int] | None = None  # replicated tensor -> the rank that copies it (None: all)
        self.bytes = 0  # what the last take() copied
        self.allocated_in_take = 0  # bytes the last take() had to allocate itself
        self.ready = threading.Event()  # set once the background allocation has ended (done, stopped or failed)
        self._buffers: dict[str, torch.Tensor] = {}
        self._stop = threading.Event()
        self._filler: threading.Thread | None = None

    def mine(self, path: str) -> bool:
        return self.owner is None or self.owner.get(path, self.rank) == self.rank

    def allocate_in_background(self, state: dict[str, Any]) -> None:
        """Start allocating (and touching) the buffers this rank's share of `state` needs."""
        wanted = [(path, _local(t)) for path, t in tensors_of(state) if self.mine(path)]
        self._stop.clear()
        self.ready.clear()
        self._filler = threading.Thread(target=self._fill, args=(wanted,), name="ckpt-buffers", daemon=True)
        self._filler.start()

    def _fill(self, wanted: list[tuple[str, torch.Tensor]]) -> None:
        try:
            for path, src in wanted:
                if self._stop.is_set():
                    return
                if not self._fits(self._buffers.get(path), src):
                    self._buffers[path] = self._allocate(src)
        except (RuntimeError, MemoryError) as err:  # take() allocates the rest, and fails the save if it must
            log.warning("allocating checkpoint buffers in the background failed: %s", err)
        finally:
            self.ready.set()

    def _stop_filling(self) -> None:
        if self._filler is not None:
            self._stop.set()
            self._filler.join()
            self._filler = None

    @staticmethod
    def _fits(buf: torch.Tensor | None, src: torch.Tensor) -> bool:
        return buf is not None and buf.shape == src.shape and buf.dtype == src.dtype

    @staticmethod
    def _allocate(src: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
        if not src.is_cuda:
            buf.zero_()  # fault the pages in now, not inside the first copy (pinning does it on GPU)
        return buf

    def _buffer_for(self, path: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if not self._fits(buf, src):
            try:
                buf = self._allocate(src)
            except (RuntimeError, MemoryError) as err:
                need_mb = src.numel() * src.element_size() / 1e6
                raise SnapshotFailed(f"cannot allocate {need_mb:.0f} MB of host memory for the checkpoint snapshot "
                                     f"of {path.lstrip('/')}: {str(err).strip().splitlines()[0]}") from None
            self._buffers[path] = buf
            self.allocated_in_take += buf.numel() * buf.element_size()
        return buf

    def take(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of this rank's share of `state` whose tensors are the reusable host buffers, valid until
        the next take(). Replicated tensors another rank copies are left out (DCP merges the ranks' plans)."""
        self._stop_filling()
        self.bytes = self.allocated_in_take = 0
        any_cuda = False
        mine = self.mine

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
                kept = {k: copy_tree(v, f"{path}/{k}") for k, v in node.items()
                        if not isinstance(v, torch.Tensor) or mine(f"{path}/{k}")}
                return {k: v for k, v in kept.items() if not _emptied(v, node[k])}
            if isinstance(node, (list, tuple)):
                return type(node)(copy_tree(v, f"{path}/{i}") for i, v in enumerate(node))
            return copy.deepcopy(node)

        snap = copy_tree(state, "")
        if any_cuda:
            torch.cuda.current_stream().synchronize()
        return snap
