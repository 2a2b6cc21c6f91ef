"""Preemption: notice sources (signals, the GCE metadata server) feeding one notice, and the health
endpoint MIG autohealing probes. It records and answers "stop now?"; it never saves anything."""

from harness.preemption.notice import MAINTENANCE, PREEMPTED_EXIT_CODE, PREEMPTION, Notice, NoticeBoard

__all__ = ["MAINTENANCE", "PREEMPTED_EXIT_CODE", "PREEMPTION", "Notice", "NoticeBoard"]
