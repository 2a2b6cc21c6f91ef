"""Everything the local Spot cloud does differently from a deployment, in one list.

Each VM of the local cloud gets the metadata `infra/vm.py` builds for the same topology (the same
job, launch settings and unit); this list is all that differs, and `chaos_report.json` carries it
as `differences_from_deploy`. Entries of kind `job` are Hydra overrides appended to every training
VM's job, `metadata` entries replace an instance attribute on every VM, and `vm` entries describe
the simulated machine itself (harness/chaos/vm.py, cloud.py, stubs/). No entry touches a launch,
restart, health or checkpoint setting (tests/chaos/test_chaos.py holds the list to that).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from infra.settings import Settings
from infra.vm import PD_DEVICE, groups

JOB, METADATA, VM = "job", "metadata", "vm"


@dataclass(frozen=True)
class Difference:
    key: str  # a Hydra key (kind job), an instance attribute (kind metadata), or a part of the VM
    deploy: str
    local: str
    why: str
    kind: str = VM

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "deploy": self.deploy, "local": self.local, "why": self.why}


def local_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def differences(cfg: DictConfig, settings: Settings) -> list[Difference]:
    """The list for this run: `cfg` is the composed job with `chaos.*`, `settings` the deployment's."""
    chaos = cfg.chaos
    notice_s = float(chaos.notice_s)
    master, workers = groups(settings)
    gpus = sorted({str(g.node.gpu_count) for g in (master, workers)})
    found = [
        Difference("notice", "30 s from the ACPI soft-off (instance/preempted=TRUE) to the hard stop",
                   f"{notice_s:g} s (chaos.notice_s)",
                   "time compression: a run here lasts minutes, not the hours between two preemptions"),
        Difference("preemption.deadline_s", f"{float(cfg.preemption.deadline_s):g}", f"{max(1.0, notice_s - 1):g}",
                   "time compression: the emergency save's deadline fits inside the compressed notice, as 25 s "
                   "fits inside 30 s", JOB),
        Difference("SPOT_SHUTDOWN_DEADLINE_S", "25 (shutdown.sh's default)", f"{max(0.5, notice_s - 0.5):g}",
                   "time compression: shutdown.sh returns before the compressed hard stop"),
        Difference("recreate", "about 60-120 s from the stop to the MIG's new VM", f"{float(chaos.recreate_s):g} s "
                   "(chaos.recreate_s)", "time compression"),
        Difference("spot-rdzv-endpoint", f"the reserved internal IP:{settings.rdzv_port}", "127.0.0.1:<a free port>",
                   "every VM is this machine's loopback; a free port lets runs and tests go side by side"),
        Difference("spot-health-port", f"{settings.health_port} on every VM", "a free port per VM",
                   "the VMs share one network namespace"),
        Difference("hostname", "each VM's own: torchrun orders a rendezvous' nodes by it, so the hybrid master "
                   "(<name>-master) holds global rank 0 ahead of <name>-worker-*",
                   "one hostname for every VM: nodes are ordered by their agent's pid; the master or coordinator "
                   "boots first and waits for the store, worker i boots i x chaos.boot_stagger_s later, so rank 0 "
                   "starts on the master (hybrid) or worker-0 (all_spot); after a round it may move",
                   "no network or UTS namespaces without root"),
        Difference("metadata server", "metadata.google.internal", "one fake server per VM on loopback "
                   "(GCE_METADATA_HOST; harness/chaos/metadata.py)", "the same attributes, preempted and "
                   "maintenance-event keys and long-polls, on this machine"),
        Difference("bucket", f"gs://{settings.infra.bucket.name} on Cloud Storage", "the same bucket name on "
                   "fake-gcs-server (STORAGE_EMULATOR_HOST; harness/chaos/gcs.py)", "no cloud access here"),
        Difference("telemetry.monitoring.enabled", f"true (project {settings.infra.project})", "false",
                   "no Cloud Monitoring API here; the sink runs on its own thread and never reaches the loop "
                   "(tests/telemetry drive it against a local gRPC server)", JOB),
        Difference("train.audit_samples", f"{str(cfg.train.audit_samples).lower()}", "true",
                   "the cloud's observer reads every step's sample indices: lost steps, repeated samples, its "
                   "own goodput", JOB),
        Difference("spot-gpu-count", " / ".join(gpus), "0", "no GPU here: the preflight's GPU check is off "
                   "(it still checks the Python and `import torch`)", METADATA),
        Difference("release", "installed from gs://<bucket>/releases/<version>/ into a fresh venv "
                   "(pip --no-index)", f"this checkout under {sys.executable} (SPOT_HARNESS_PYTHON, PYTHONPATH): "
                   "startup.sh installs nothing", "a release needs the wheelhouse (GBs of CUDA wheels)"),
        Difference("system commands", "systemd, mount, mountpoint", "stubs first on PATH (harness/chaos/stubs): "
                   "systemctl runs the unit for real (harness/chaos/systemctl.py: restart policy, kill, is-active), "
                   "mount mounts nothing, mountpoint finds no mount", "no root"),
        Difference("disks", "Local SSDs /dev/disk/by-id/google-local-nvme-ssd-* and the master's "
                   f"/dev/disk/by-id/google-{PD_DEVICE}, formatted and mounted",
                   "sparse files in the VM's dev/ (SPOT_LOCAL_SSD_GLOB, spot-pd-device), formatted by the real "
                   "mkfs.ext4; the mount points stay directories of the VM's root, wiped with it",
                   "no block devices without root"),
        Difference("unit environment", "systemd starts a unit from a clean environment",
                   "units inherit the VM's (the metadata host, the emulator, the checkout's PYTHONPATH)",
                   "how the VM's addresses reach the job"),
        Difference("Compute API", "at the job's end rank 0 resizes the instance groups to 0 "
                   "(harness/job_end.py)", "none here (SPOT_COMPUTE_ENDPOINT unset): the job's end prints the "
                   "groups and resizes nothing; the cloud stops once the summary is written and the units ended",
                   "no cloud access here"),
        Difference("autohealing", "GET /healthz every 30 s; 3 failures recreate the VM",
                   "not simulated: a VM is recreated only after its preemption (the launcher serves /healthz; "
                   "tests/test_health.py checks it)", "the schedule, not a health check, decides the VMs' fates"),
    ]
    if settings.infra.image.python != local_python():
        found.append(Difference("spot-python", settings.infra.image.python, local_python(),
                                "the preflight checks the Python the release was built for; here the checkout's "
                                "own runs", METADATA))
    return found


def job_overrides(found: list[Difference]) -> list[str]:
    """The list's Hydra overrides, appended to every training VM's job."""
    return [f"{d.key}={d.local}" for d in found if d.kind == JOB]


def attributes(found: list[Difference]) -> dict[str, str]:
    """The list's instance attributes, the same on every VM."""
    return {d.key: d.local for d in found if d.kind == METADATA}
