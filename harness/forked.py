"""What each worker runs when torchrun forks it instead of starting an interpreter (launch.workers=fork,
harness/launch.py): `python -u -m MODULE ARGS...`, given as `--run-path harness/forked.py -m MODULE ARGS...`.

A forked worker inherits the agent's imported torch (seconds of imports per worker per restart) but also
its command line, signal handlers and objects. So before the module runs, it names itself as the
worker torchrun would have started (`ps` and the tools that find workers by command line see the same
tree as before), puts the signals back as a new interpreter has them, and freezes the inherited objects
out of the garbage collector (never garbage; scanning them would copy their pages for nothing).
"""

from __future__ import annotations

import ctypes
import gc
import runpy
import signal
import sys
from pathlib import Path


def set_cmdline(args: list[str]) -> None:
    """Overwrite this process's command line (/proc/self/cmdline, what `ps` shows) in place, as
    setproctitle does: Linux keeps it in the argv area, `arg_start`..`arg_end` in /proc/self/stat; a
    longer one is cut to that length. Where /proc does not tell, the agent's command line stays."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # stat fields 48 and 49
    except (OSError, IndexError, ValueError):
        return
    text = b"\0".join(a.encode() for a in args)[: end - start - 1]
    ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)


def main() -> None:
    if sys.argv[1:2] != ["-m"] or len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} -m MODULE [ARGS...] (torchrun --run-path's script)")
    module, args = sys.argv[2], sys.argv[3:]
    set_cmdline([sys.executable, "-u", "-m", module, *args])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.freeze()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
