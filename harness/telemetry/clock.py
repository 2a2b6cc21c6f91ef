"""When a process started, as a wall-clock time, from Linux's /proc: light enough for the launcher."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_start_time(pid: int | str = "self") -> float:
    """The process's start in clock ticks since boot, placed on the wall clock through the boot clock
    read now (/proc/stat's btime is whole seconds: up to 1 s off); now when /proc cannot tell."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
