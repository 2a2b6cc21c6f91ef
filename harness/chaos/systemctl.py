"""Just enough of systemd for startup.sh and shutdown.sh on a simulated VM: the `systemctl` on its PATH.

    systemctl daemon-reload                      nothing to do
    systemctl start UNIT                         run the unit's ExecStart under a supervisor (no-op if active)
    systemctl is-active [--quiet] UNIT           0 while the main process runs, 3 otherwise
    systemctl kill [--signal=SIG] UNIT           SIG to every process of the unit (its "cgroup")
    systemctl stop UNIT                          SIGTERM, then SIGKILL after TimeoutStopSec; no restart

The supervisor is a child subreaper, so the unit's processes stay below it even when torchrun puts
its workers in sessions of their own: the unit's process tree is its cgroup. It honours
WorkingDirectory, Environment, EnvironmentFile, Restart (on-failure, always), RestartSec,
SuccessExitStatus, RestartPreventExitStatus and TimeoutStopSec, and appends the unit's output to
`$SPOT_CHAOS_LOG_DIR/<unit>.log` (the journal). Units inherit the environment of `systemctl start`
(the VM's), where real systemd would start from a clean one. The unit file format is the one
startup/README.md specifies.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.process_tree import alive, descendants

PR_SET_CHILD_SUBREAPER = 36
START_TIMEOUT_S = 30.0
EXITED = "chaos-systemd: {unit}: main process exited with {code}"  # the journal's line per exit


@dataclass
class Unit:
    name: str
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    restart: str = "no"
    restart_s: float = 0.1
    success: set[int] = field(default_factory=lambda: {0})
    prevent_restart: set[int] = field(default_factory=set)
    stop_timeout_s: float = 90.0

    @classmethod
    def load(cls, path: Path) -> Unit:
        unit = cls(path.name, [])
        for raw in path.read_text().splitlines():
            key, sep, value = raw.partition("=")
            if not sep or raw.startswith("#"):
                continue
            if key == "ExecStart":
                unit.argv = parse_exec_start(value)
            elif key == "WorkingDirectory":
                unit.cwd = value
            elif key == "Environment":
                name, _, val = value.partition("=")
                unit.env[name] = val
            elif key == "EnvironmentFile":
                unit.env.update(_env_file(Path(value.removeprefix("-"))))
            elif key == "Restart":
                unit.restart = value
            elif key == "RestartSec":
                unit.restart_s = float(value)
            elif key == "SuccessExitStatus":
                unit.success |= {int(v) for v in value.split()}
            elif key == "RestartPreventExitStatus":
                unit.prevent_restart |= {int(v) for v in value.split()}
            elif key == "TimeoutStopSec":
                unit.stop_timeout_s = float(value)
        if not unit.argv:
            raise ValueError(f"{path}: no ExecStart= line")
        return unit

    def restarts_after(self, code: int) -> bool:
        if code in self.prevent_restart:
            return False
        return self.restart == "always" or (self.restart == "on-failure" and code not in self.success)


def parse_exec_start(value: str) -> list[str]:
    """argv from the value of an ExecStart= line that startup.sh wrote (the format in startup/README.md)."""
    return [token.replace("$$", "$").replace("%%", "%") for token in shlex.split(value)]


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                env[name.strip()] = value
    return env


def _root() -> Path:
    return Path(os.environ.get("SPOT_ROOT", "/"))


def _state_dir() -> Path:
    path = _root() / "run" / "chaos-systemd"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_state(unit: str, root: Path | None = None) -> tuple[str, int, int]:
    """(state, supervisor pid, main pid); state is active, activating, inactive or failed."""
    try:
        path = (root / "run" / "chaos-systemd" if root else _state_dir()) / f"{unit}.state"
        state, supervisor, main = path.read_text().split()
        return state, int(supervisor), int(main)
    except (OSError, ValueError):
        return "inactive", 0, 0


def unit_active(root: Path, unit: str) -> bool:
    """`systemctl is-active` of a VM whose SPOT_ROOT is root, without starting a process."""
    state, supervisor, main = _read_state(unit, root)
    return state == "active" and alive(supervisor) and alive(main)


def unit_exits(log_dir: Path, unit: str) -> list[int]:
    """The exit codes of a unit's main process in order, from its journal in `log_dir` (one boot's)."""
    try:
        text = (log_dir / f"{unit}.log").read_text(errors="replace")
    except OSError:
        return []
    pattern = re.compile("^" + re.escape(EXITED.format(unit=unit, code="@")).replace("@", r"(-?\d+)") + "$", re.M)
    return [int(code) for code in pattern.findall(text)]


def _write_state(unit: str, state: str, main: int = 0) -> None:
    tmp = _state_dir() / f".{unit}.state.tmp"
    tmp.write_text(f"{state} {os.getpid()} {main}\n")
    os.replace(tmp, _state_dir() / f"{unit}.state")


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ the supervisor (one per started unit)


def _journal(stream) -> None:
    """Copy the unit's output to the supervisor's (the journal file), each line stamped like journald."""
    for line in iter(stream.readline, b""):
        stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        sys.stdout.buffer.write(stamp.encode() + b" " + line)
        sys.stdout.buffer.flush()


class Supervisor:
    def __init__(self, unit: Unit):
        self.unit = unit
        self.stopping = False
        self.main: subprocess.Popen | None = None

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        signal.signal(signal.SIGTERM, lambda _s, _f: self._stop())
        env = {**os.environ, **self.unit.env}
        while True:
            self.main = subprocess.Popen(self.unit.argv, cwd=self.unit.cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            _write_state(self.unit.name, "active", self.main.pid)
            journal = threading.Thread(target=_journal, args=(self.main.stdout,), daemon=True)
            journal.start()
            code = self._wait_main()
            journal.join(timeout=5)
            self._reap_orphans()
            print(EXITED.format(unit=self.unit.name, code=code), flush=True)
            if self.stopping or not self.unit.restarts_after(code):
                _write_state(self.unit.name, "inactive" if code in self.unit.success else "failed")
                return 0
            _write_state(self.unit.name, "activating")
            time.sleep(self.unit.restart_s)
            if self.stopping:
                _write_state(self.unit.name, "inactive")
                return 0

    def _wait_main(self) -> int:
        while True:
            try:
                code = self.main.wait()  # type: ignore[union-attr]
                return code if code >= 0 else 128 - code
            except InterruptedError:
                continue

    def _reap_orphans(self) -> None:
        """Processes of the unit left behind by its main process: systemd kills them (KillMode=control-group)."""
        _signal_all(descendants(os.getpid()), signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break

    def _stop(self) -> None:
        self.stopping = True
        _signal_all(descendants(os.getpid()), signal.SIGTERM)
        deadline = time.monotonic() + self.unit.stop_timeout_s
        while descendants(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_all(descendants(os.getpid()), signal.SIGKILL)


# ------------------------------------------------------------------ commands


def start(name: str) -> int:
    state, supervisor, _ = _read_state(name)
    if state in ("active", "activating") and alive(supervisor):
        return 0
    Unit.load(_root() / "etc" / "systemd" / "system" / name)  # fail here, naming the file, when it is bad
    log_dir = Path(os.environ.get("SPOT_CHAOS_LOG_DIR", _root() / "var" / "log"))
    log_dir.mkdir(parents=True, exist_ok=True)
    _write_state(name, "activating")
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness.chaos.systemctl", "_supervise", name],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state, supervisor, _ = _read_state(name)
        if supervisor == proc.pid and state != "activating":
            return 0
        if proc.poll() is not None:
            print(f"systemctl: {name} failed to start", file=sys.stderr)
            return 1
        time.sleep(0.02)
    print(f"systemctl: {name} did not start within {START_TIMEOUT_S:.0f}s", file=sys.stderr)
    return 1


def is_active(name: str, quiet: bool) -> int:
    state, _, _ = _read_state(name)
    active = unit_active(_root(), name)
    if not quiet:
        print("active" if active else state if state != "active" else "inactive")
    return 0 if active else 3


def kill(name: str, sig: int) -> int:
    _, supervisor, _ = _read_state(name)
    if not alive(supervisor):
        return 1
    _signal_all(descendants(supervisor), sig)
    return 0


def stop(name: str) -> int:
    state, supervisor, _ = _read_state(name)
    if not alive(supervisor):
        return 0
    os.kill(supervisor, signal.SIGTERM)
    while alive(supervisor):
        time.sleep(0.05)
    return 0


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    if not args:
        print("systemctl: no command", file=sys.stderr)
        return 1
    command, names = args[0], args[1:]
    if command == "daemon-reload":
        return 0
    if command == "_supervise":
        return Supervisor(Unit.load(_root() / "etc" / "systemd" / "system" / names[0])).run()
    if len(names) != 1:
        print(f"systemctl {command}: expected one unit, got {names}", file=sys.stderr)
        return 1
    name = names[0]
    if command == "start":
        return start(name)
    if command == "is-active":
        return is_active(name, "--quiet" in flags or "-q" in flags)
    if command == "kill":
        sig = next((f.split("=", 1)[1] for f in flags if f.startswith("--signal=")), "SIGTERM")
        return kill(name, signal.Signals[sig if sig.startswith("SIG") else f"SIG{sig}"])
    if command == "stop":
        return stop(name)
    print(f"systemctl: {command} is not simulated", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
