"""Reading a checkpoint without running it.

Whoever can write to the checkpoint bucket is a broader set of people than whoever can run code on
the training VMs, so a checkpoint must be data, never code. DCP itself unpickles in two places: the
`.metadata` file (`pickle.load`) and every non-tensor entry (`torch.load(weights_only=False)`). Here
the metadata is read by an unpickler that only builds DCP's own metadata classes, and non-tensor
entries (the optimizer's hyperparameters) load with `weights_only=True`. Our own state (progress, RNG)
is stored as tensors, so nothing of ours needs more. Anything else is refused with the entry named.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from harness.checkpoint.manifest import CorruptCheckpoint

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(CorruptCheckpoint):
    """A checkpoint entry that would need arbitrary unpickling to load: refused, never run."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpoint(self.where, f"refusing to load: the DCP metadata references {module}.{name}, "
                                           "which is not part of a checkpoint's metadata")


def read_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of a checkpoint directory, unpickled with the allowlist above."""
    where = str(path / ".metadata")
    try:
        data = (path / ".metadata").read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(where, "DCP metadata missing") from None
    try:
        metadata = _MetadataUnpickler(data, where).load()
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed pickle is a corrupt checkpoint
        raise CorruptCheckpoint(where, f"unreadable DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(where, f"DCP metadata is a {type(metadata).__name__}, not Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata never runs code (DCP calls read_metadata during load too)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries load with weights_only=True; one that needs more is refused by name."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(self.where, f"refusing to load entry {fqn!r}: {str(err).splitlines()[0]}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
