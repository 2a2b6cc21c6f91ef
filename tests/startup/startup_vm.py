"""A stubbed VM for running startup/*.sh as an ordinary process, against the local Spot cloud's fake
metadata server (harness/chaos/fake_metadata.py), in the machine the local cloud's VMs give the
scripts (harness/chaos/vm.py's machine_env) but with stubs that record what the scripts do to it.

The scripts run for real: bash, curl against the fake server, files written under a temp SPOT_ROOT.
Only the commands with effects on the machine are stubs (tests/startup/stubs, first on PATH); each
appends its argv to a log, and mdadm/mkfs/mount keep just enough state (tests/startup/stubs) for a
second run to see what the first one did.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.chaos.fake_metadata import FakeMetadata
from harness.chaos.systemctl import parse_exec_start
from harness.chaos.vm import SSD_NAME, machine_env

REPO = Path(__file__).resolve().parents[2]
STARTUP_SH = REPO / "startup" / "startup.sh"
SHUTDOWN_SH = REPO / "startup" / "shutdown.sh"
STUBS = Path(__file__).resolve().parent / "stubs"
AGENT_ENGINE = "/opt/google-cloud-ops-agent/libexec/google_cloud_ops_agent_engine"
AGENT_CONFIG = "/etc/google-cloud-ops-agent/config.yaml"
AGENT_PACKAGE = "google-cloud-ops-agent_2.49.0~ubuntu24.04_amd64.deb"  # the repository's name form


@dataclass
class Vm:
    """One fake VM: its SPOT_ROOT, devices, stub state and metadata."""

    tmp: Path
    metadata: FakeMetadata
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.tmp / "root"
        self.dev = self.tmp / "dev"
        self.state = self.tmp / "stub-state"
        self.log = self.tmp / "stub.log"
        for folder in (self.root, self.dev, self.state):
            folder.mkdir()
        self.pd_device = self.dev / "google-checkpoint-pd"
        self.pd_device.touch()
        self.metadata.attributes.update(
            {
                "spot-role": "master",
                "spot-bucket": "spot-bkt",
                "spot-release": "v7",
                "spot-run-id": "run-42",
                "spot-rdzv-endpoint": "10.0.0.2:29400",
                "spot-nnodes": "1:4",
                "spot-nproc-per-node": "8",
                "spot-hydra-overrides": "train.max_steps=1000 model.n_layer=12",
                "spot-wandb-secret": "wandb-key",
                "spot-pd-device": str(self.pd_device),
            }
        )
        self.publish_release("v7")

    def bucket_path(self, object_name: str, bucket: str = "spot-bkt") -> Path:
        """Where the gcloud stub keeps an object of the fake bucket."""
        return self.state / "bucket" / bucket / object_name

    def publish_release(self, version: str, *, manifest: bool = True, corrupt: str | None = None,
                        agent: bool = False) -> dict:
        """Publish a release as `make deploy` does (infra/release.py's layout): files under
        releases/<version>/, wheels under wheels/, with `agent` the Ops Agent package under agents/,
        manifest.json (with every sha256) last. `corrupt` names a file whose uploaded bytes differ
        from what its manifest entry says."""
        files = {
            "spot_harness-0.1.0-py3-none-any.whl": b"harness wheel",
            "requirements.txt": b"numpy==2.4.6\n",
            "conf/config.yaml": b"defaults: []\n",
        }
        wheels = {"pip-24.0-py3-none-any.whl": b"pip wheel", "numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl": b"np"}
        shared = {f"wheels/{n}": d for n, d in wheels.items()}
        if agent:
            shared[f"agents/{AGENT_PACKAGE}"] = b"ops agent package"
        entries = {}
        for path, data in [*files.items(), *shared.items()]:
            obj = path if path in shared else f"releases/{version}/{path}"
            target = self.bucket_path(obj)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data + (b" tampered" if path == corrupt else b""))
            entries[path] = {"object": obj, "sha256": hashlib.sha256(data).hexdigest()}
        content = {"release": version, "wheel": "spot_harness-0.1.0-py3-none-any.whl", "files": entries}
        if manifest:
            self.bucket_path(f"releases/{version}/manifest.json").write_text(json.dumps(content))
        return content

    def install_agent(self) -> None:
        """The image brings the Ops Agent: its engine is where startup.sh looks for it."""
        engine = self.path(AGENT_ENGINE)
        engine.parent.mkdir(parents=True, exist_ok=True)
        engine.write_text("#!/bin/sh\n")
        engine.chmod(0o755)

    def unpublish(self, version: str) -> None:
        self.bucket_path(f"releases/{version}/manifest.json").unlink()

    def add_ssds(self, count: int) -> list[str]:
        paths = [self.dev / f"{SSD_NAME}{i}" for i in range(count)]
        for path in paths:
            path.touch()
        return [str(p) for p in paths]

    def has_filesystem(self, device: str | Path) -> None:
        (self.state / ("fs" + str(device).replace("/", "_"))).touch()

    def blkid_answers(self, device: str | Path, rc: int) -> None:
        (self.state / ("blkid-rc" + str(device).replace("/", "_"))).write_text(str(rc))

    def reboot(self) -> None:
        """Mounts and assembled arrays go; filesystems, RAID superblocks and the boot disk stay."""
        (self.state / "mounts").unlink(missing_ok=True)
        for path in self.state.glob("assembled*"):
            path.unlink()

    def base_env(self, **extra: str) -> dict[str, str]:
        env = {
            **machine_env(self.root, self.dev, self.tmp, self.metadata.host, STUBS),
            "SPOT_DEVICE_WAIT_S": "2",
            "STUB_LOG": str(self.log),
            "STUB_STATE": str(self.state),
            "SPOT_RELEASE_POLL_S": "1",
            "SPOT_CONSOLE": str(self.tmp / "console"),
        }
        env.update(self.env)
        env.update(extra)
        return env

    def run(self, script: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(script)], env=self.base_env(**extra), capture_output=True, text=True, timeout=60
        )

    def startup(self, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run(STARTUP_SH, **extra)

    def startup_in_background(self, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["bash", str(STARTUP_SH)], env=self.base_env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def release_dir(self, version: str = "v7") -> Path:
        return self.path(f"/opt/spot/releases/{version}")

    def pip_installs(self) -> list[list[str]]:
        return [c for c in self.calls("venv-python") if "install" in c]

    def calls(self, name: str | None = None) -> list[list[str]]:
        """The stub calls so far, each as [command, args...], optionally only those of one command."""
        if not self.log.exists():
            return []
        lines = [shlex.split(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [c for c in lines if name is None or c[0] == name]

    def clear_calls(self) -> None:
        self.log.unlink(missing_ok=True)

    def path(self, absolute: str) -> Path:
        """A real path under this VM's SPOT_ROOT."""
        return self.root / absolute.lstrip("/")

    def unit(self, name: str = "spot-train.service") -> str:
        return self.path(f"/etc/systemd/system/{name}").read_text()

    def exec_start(self, name: str = "spot-train.service") -> list[str]:
        lines = [line for line in self.unit(name).splitlines() if line.startswith("ExecStart=")]
        assert len(lines) == 1, lines
        return parse_exec_start(lines[0][len("ExecStart=") :])
