"""Tiered, asynchronous, atomic and verified checkpoints (DCP format). See manager.py for the path a
checkpoint takes."""

from harness.checkpoint.manager import CheckpointManager, CheckpointMismatch, NoUsableCheckpoint, Report
from harness.checkpoint.store import CommitConflict, StoreError

__all__ = [
    "CheckpointManager",
    "CheckpointMismatch",
    "CommitConflict",
    "NoUsableCheckpoint",
    "Report",
    "StoreError",
]
