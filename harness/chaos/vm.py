"""One simulated VM: the startup and shutdown scripts of its metadata, run as ordinary processes.

A VM is a root directory (`SPOT_ROOT`: its boot disk, with its disks as sparse files in dev/), a fake
metadata server of its own serving its attributes, the stubbed system commands of `stubs/` first on
its PATH (`systemctl` runs units for real), and every process it starts, tagged by
`SPOT_CHAOS_VM=<id>` in their environment: the tag is how the whole VM is killed at once, torchrun's
workers in their own sessions included. As GCE's guest agent does, it runs the `startup-script` and
`shutdown-script` attributes. Deleting the VM kills those processes and wipes its root, local SSD and
all. Unit output (the journal) and the scripts' logs go to a log folder outside the root, which
survives the VM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.chaos.fake_metadata import FakeMetadata
from harness.chaos.systemctl import unit_active

REPO = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"
TAG = "SPOT_CHAOS_VM"
SSD_MOUNT = "/mnt/localssd"
SSD_NAME = "google-local-nvme-ssd-"  # how the guest names NVMe Local SSDs (startup.sh globs them)
DISK_BYTES = 16 << 20  # a sparse file is enough for mkfs.ext4; the mount point stays a directory
TRAIN_UNIT = "spot-train.service"


def machine_env(root: Path, dev: Path, home: Path, metadata_host: str, stubs: Path) -> dict[str, str]:
    """How startup/*.sh sees a machine that is not a GCE VM: its root (SPOT_ROOT, where `/` is),
    metadata server, NVMe Local SSD devices (in `dev`), and stubbed system commands first on PATH. The
    local cloud's VMs run the scripts in it, and so do the scripts' own tests (tests/startup)."""
    return {
        "PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "SPOT_ROOT": str(root),
        "GCE_METADATA_HOST": metadata_host,
        "SPOT_LOCAL_SSD_GLOB": str(dev / f"{SSD_NAME}*"),
    }


@dataclass
class VmSpec:
    name: str
    role: str  # master | worker | coordinator (startup.sh's spot-role)
    spot: bool
    attributes: dict[str, str] = field(default_factory=dict)  # the instance metadata, scripts included
    disks: list[str] = field(default_factory=list)  # device files in the VM's dev/, blank at every boot


class Vm:
    """One incarnation of a VM (a recreated VM is a new Vm with a fresh root and the same name)."""

    def __init__(self, spec: VmSpec, root: Path, logs: Path, tag: str, env: dict[str, str]):
        self.spec = spec
        self.root = root
        self.logs = logs
        self.tag = tag
        self.metadata = FakeMetadata(spec.attributes)
        self.env = {
            **machine_env(root, root / "dev", root / "root", self.metadata.host, STUBS),
            "TMPDIR": str(root / "tmp"),
            "SPOT_HARNESS_PYTHON": sys.executable,
            "SPOT_CHAOS_LOG_DIR": str(logs),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            TAG: tag,
            **env,
        }
        self._startup: subprocess.Popen | None = None
        self._shutdown: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> Path:
        """The trainer's run.dir: on the local SSD, as startup.sh sets it."""
        return self.root / SSD_MOUNT.lstrip("/") / "runs" / self.spec.attributes.get("spot-run-id", "")

    def boot(self) -> None:
        """Power on: a blank root and blank disks, then the startup script, in the background."""
        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("root", "tmp", "dev", "var/run"):
            (self.root / sub).mkdir(parents=True)
        for disk in self.spec.disks:
            with open(self.root / "dev" / disk, "wb") as f:
                f.truncate(DISK_BYTES)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._startup = self._script("startup-script", "startup.log", {})

    def booted(self) -> int | None:
        """The startup script's exit code once it has finished."""
        return self._startup.poll() if self._startup else None

    def preempt(self, notice_s: float) -> None:
        """What GCE does at a preemption: `instance/preempted` turns TRUE and the shutdown script runs
        (it has the notice to finish, less a moment for the OS to power off)."""
        self.metadata.preempt()
        self._shutdown = self._script("shutdown-script", "shutdown.log",
                                      {"SPOT_SHUTDOWN_DEADLINE_S": f"{max(0.5, notice_s - 0.5):g}"})

    def shut_down(self) -> bool:
        """The shutdown script has returned and the training unit's processes have exited: the OS can
        power off before the hard stop."""
        if self._shutdown is None or self._shutdown.poll() is None:
            return False
        return not self._unit_active(TRAIN_UNIT)

    def _unit_active(self, unit: str) -> bool:
        return unit_active(self.root, unit)

    def trainer_finished(self) -> bool:
        """The training unit has run and ended (inactive or failed), as after a finished job."""
        return self._startup is not None and self._startup.poll() == 0 and not self._unit_active(TRAIN_UNIT)

    def processes(self) -> list[int]:
        """Every live process started in this VM (found by the tag in its environment)."""
        needle = f"{TAG}={self.tag}".encode() + b"\0"
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes():
                    found.append(int(environ.parent.name))
            except OSError:
                continue
        return found

    def kill(self) -> None:
        """The hard stop: SIGKILL to every process of the VM, until none is left."""
        deadline = time.monotonic() + 10.0
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for proc in (self._startup, self._shutdown):
            if proc is not None and proc.poll() is None:
                proc.wait()

    def delete(self) -> None:
        """Kill everything and wipe the disks (a MIG-recreated VM starts from blank local SSDs)."""
        self.kill()
        self.metadata.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _script(self, key: str, log_name: str, extra: dict[str, str]) -> subprocess.Popen:
        """Run the script of metadata `key` as GCE's guest agent does: from a file, under bash."""
        script = self.root / "var" / "run" / f"google.{key}"
        script.write_text(self.spec.attributes[key])
        with open(self.logs / log_name, "ab") as log:
            return subprocess.Popen(["bash", str(script)], env={**self.env, **extra}, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
