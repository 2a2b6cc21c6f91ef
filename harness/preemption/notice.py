"""One notice object fed by every source. Signal handlers only record (no I/O, no locks).

A notice has a kind, which tells the loop how to leave once the emergency save is durable:
- PREEMPTION: the VM is going away (a signal, `instance/preempted`, a maintenance event on a Spot
  VM); exit PREEMPTED_EXIT_CODE and the MIG recreates the VM.
- MAINTENANCE: a host maintenance event on an on-demand VM, a planned stop; the VM itself comes back
  after the host event, so the exit must be one its unit restarts on.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry". The launch scripts
# and systemd read it as "preempted: checkpoint saved, restart me".
PREEMPTED_EXIT_CODE = 75
# The file in ${run.dir} the trainer leaves after its emergency save (JSON: step, tier, ok, seconds,
# source); the launcher and shutdown.sh wait on it.
PREEMPTED_MARKER = "PREEMPTED"
# Left instead on a node that got no notice when a peer was preempted: its launcher goes straight
# back to rendezvous (the VM and its unit keep running).
REJOIN_MARKER = "REJOIN"
# A planned stop (MAINTENANCE on an on-demand VM): not 75, so the unit restarts the job after the
# host event instead of leaving it stopped.
PLANNED_STOP_EXIT_CODE = 76
PREEMPTION = "preemption"
MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class Notice:
    source: str  # "SIGTERM", "metadata:preempted", ...
    time: float  # time.time() when recorded
    deadline: float  # time.time() by which the emergency save must be durable
    kind: str = PREEMPTION  # PREEMPTION | MAINTENANCE


class NoticeBoard:
    """Holds the first notice; later ones are counted but move neither its deadline nor its kind."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.notice: Notice | None = None
        self.count = 0

    def record(self, source: str, kind: str = PREEMPTION) -> None:
        self.count += 1
        if self.notice is None:
            now = time.time()
            self.notice = Notice(source, now, now + self.deadline_s, kind)

    @property
    def pending(self) -> bool:
        return self.notice is not None

    def seconds_left(self) -> float:
        return self.notice.deadline - time.time() if self.notice else self.deadline_s

    def install_signal_handlers(self, names: list[str]) -> None:
        for name in names:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                raise ValueError(f"preemption.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            signal.signal(signum, lambda s, _frame: self.record(signal.Signals(s).name))
