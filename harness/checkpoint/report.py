"""What the checkpoint engine did (a save, a commit, a promotion, an emergency save, a restore), as the
engine and its promoters report it for the loop to forward to telemetry."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    SAVE = "save"  # the loop's pause: snapshot taken, the write goes on in the background
    COMMIT = "commit"  # the first tier committed the step
    PROMOTE = "promote"  # a slower tier committed a copy
    EMERGENCY = "emergency"  # the save on a notice, and where it became durable
    RESTORE = "restore"
    RETENTION = "retention"  # a delete that failed


@dataclass
class Report:
    """What the engine did, for the loop to forward to telemetry."""

    kind: Kind
    step: int
    tier: str = ""
    seconds: float = 0.0
    bytes: int = 0
    ok: bool = True
    detail: str = ""
    extra: dict = field(default_factory=dict)
