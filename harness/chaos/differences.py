"""Everything the local Spot cloud does differently from a deployment, in one list.

Each VM of the local cloud gets the metadata `infra/vm.py` builds for the same topology (the same
job, launch settings and unit); this list is all that differs, and `chaos_report.json` carries it
as `differences_from_deploy`. Entries of kind `job` are Hydra overrides appended to every training
VM's job, `metadata` entries replace an instance attribute on every VM, and `vm` entries describe
the simulated machine itself (harness/chaos/vm.py, cloud.py, stubs/). Each entry is one of three
`why`s: time compression (a run here lasts minutes), an address (every VM is this machine's
loopback) or a stub (a local stand-in for a cloud service or a device). No entry touches a launch,
restart, health or checkpoint setting, and no entry is of another kind (tests/chaos/test_chaos.py
holds the list to both).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from infra.settings import Settings
from infra.vm import PD_DEVICE, groups

JOB, METADATA, VM = "job", "metadata", "vm"
TIME, ADDRESS, STUB = "time compression", "address", "stub"
CATEGORIES = (TIME, ADDRESS, STUB)


@dataclass(frozen=True)
class Difference:
    key: str  # a Hydra key (kind job), an instance attribute (kind metadata), or a part of the VM
    deploy: str
    local: str
    category: str  # TIME | ADDRESS | STUB
    why: str
    kind: str = VM

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "deploy": self.deploy, "local": self.local, "category": self.category,
                "why": self.why}


def local_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def differences(cfg: DictConfig, settings: Settings, monitoring_endpoint: str) -> list[Difference]:
    """The list for this run: `cfg` is the composed job with `chaos.*`, `settings` the deployment's,
    `monitoring_endpoint` the local Cloud Monitoring server's host:port."""
    chaos, check = cfg.chaos, settings.infra.health_check
    notice_s = chaos.notice_s
    master, workers = groups(settings)
    gpus = sorted({str(g.node.gpu_count) for g in (master, workers)})
    found = [
        Difference("notice", "30 s from the ACPI soft-off (instance/preempted=TRUE) to the hard stop",
                   f"{notice_s:g} s (chaos.notice_s)", TIME,
                   "a run here lasts minutes, not the hours between two preemptions"),
        Difference("preemption.deadline_s", f"{float(cfg.preemption.deadline_s):g}", f"{max(1.0, notice_s - 1):g}",
                   TIME, "the emergency save's deadline fits inside the compressed notice, as 25 s fits inside "
                   "30 s", JOB),
        Difference("SPOT_SHUTDOWN_DEADLINE_S", "25 (shutdown.sh's default)", f"{max(0.5, notice_s - 0.5):g}",
                   TIME, "shutdown.sh returns before the compressed hard stop"),
        Difference("recreate", "a few minutes from the stop to the MIG's new Spot GPU VM (boot, driver)",
                   f"{chaos.recreate_s:g} s (chaos.recreate_s)", TIME, "the MIG's delay, compressed"),
        Difference("autohealing", f"GET /healthz every {check.interval_s} s after {check.initial_delay_s} s; "
                   f"{check.unhealthy_threshold} failures recreate the VM",
                   f"every {chaos.health_interval_s:g} s after {chaos.health_initial_delay_s:g} s "
                   "(chaos.health_*); the same threshold and the same /healthz bounds", TIME,
                   "the check's cadence, compressed; what it asks and when it fails are the deployment's"),
        Difference("spot-rdzv-endpoint", f"the reserved internal IP:{settings.rdzv_port}", "127.0.0.1:<a free port>",
                   ADDRESS, "every VM is this machine's loopback; a free port lets runs and tests go side by side"),
        Difference("spot-health-port", f"{settings.health_port} on every VM", "a free port per VM", ADDRESS,
                   "the VMs share one network namespace"),
        Difference("hostname", "each VM's own: torchrun orders a rendezvous' nodes by it, so the hybrid master "
                   "(<name>-master) holds global rank 0 ahead of <name>-worker-*",
                   "one hostname for every VM: nodes are ordered by their agent's pid; the master or coordinator "
                   "boots first and waits for the store, worker i boots i x chaos.boot_stagger_s later, so rank 0 "
                   "starts on the master (hybrid) or worker-0 (all_spot); after a round it may move", ADDRESS,
                   "no network or UTS namespaces without root"),
        Difference("unit environment", "systemd starts a unit from a clean environment",
                   "units inherit the VM's: the stand-ins' addresses (GCE_METADATA_HOST, STORAGE_EMULATOR_HOST, "
                   "SPOT_COMPUTE_ENDPOINT) and the checkout's PYTHONPATH", ADDRESS,
                   "how the stand-ins' addresses reach the job"),
        Difference("metadata server", "metadata.google.internal", "one fake server per VM on loopback "
                   "(GCE_METADATA_HOST; harness/chaos/fake_metadata.py)", STUB, "the same attributes, preempted and "
                   "maintenance-event keys and long-polls, on this machine"),
        Difference("bucket", f"gs://{settings.infra.bucket.name} on Cloud Storage", "the same bucket name on "
                   "fake-gcs-server (STORAGE_EMULATOR_HOST; harness/chaos/fake_gcs.py)", STUB, "no cloud access here"),
        Difference("telemetry.monitoring.endpoint", "null (monitoring.googleapis.com)", monitoring_endpoint, STUB,
                   "no cloud access here: a local MetricService gRPC server (harness/chaos/fake_monitoring.py) takes "
                   "the same sink's requests for the same project", JOB),
        Difference("Compute API", "compute.googleapis.com: at the job's end rank 0 resizes the instance groups "
                   "to 0 (harness/job_end.py), and the MIGs delete their VMs",
                   "a local Compute API holding the groups' sizes (SPOT_COMPUTE_ENDPOINT; "
                   "harness/chaos/fake_compute.py): a group at 0 recreates nothing, its VMs are deleted once "
                   "their unit has ended", STUB,
                   "no Compute Engine emulator exists"),
        Difference("logs", "the Ops Agent ships the units' and scripts' journal to Cloud Logging with the "
                   "VM, role, run and boot as labels (infra/logs.py)", "no agent (startup.sh logs `ops agent: not "
                   "installed`): each boot's journal stays under the cloud's logs/<vm>/boot-<n>/", STUB,
                   "no Cloud Logging here"),
        Difference("spot-gpu-count", " / ".join(gpus), "0", STUB, "no GPU here: the preflight's GPU check is off "
                   "(it still checks the Python and `import torch`)", METADATA),
        Difference("release", "installed from gs://<bucket>/releases/<version>/ into a fresh venv "
                   "(pip --no-index)", f"this checkout under {sys.executable} (SPOT_HARNESS_PYTHON, PYTHONPATH): "
                   "startup.sh installs nothing", STUB, "the checkout stands in for its own release: a release "
                   "needs the wheelhouse (GBs of CUDA wheels)"),
        Difference("system commands", "systemd, mount, mountpoint", "stubs first on PATH (harness/chaos/stubs): "
                   "systemctl runs the unit for real (harness/chaos/systemctl.py: restart policy, kill, is-active), "
                   "mount mounts nothing, mountpoint finds no mount", STUB, "no root"),
        Difference("disks", "Local SSDs /dev/disk/by-id/google-local-nvme-ssd-* and the master's "
                   f"/dev/disk/by-id/google-{PD_DEVICE}, formatted and mounted",
                   "sparse files in the VM's dev/ (SPOT_LOCAL_SSD_GLOB, spot-pd-device), formatted by the real "
                   "mkfs.ext4; the mount points stay directories of the VM's root, wiped with it", STUB,
                   "no block devices without root"),
    ]
    if settings.infra.image.python != local_python():
        found.append(Difference("spot-python", settings.infra.image.python, local_python(), STUB,
                                "the checkout's Python stands in for the image's: the preflight checks the "
                                "Python the release was built for", METADATA))
    return found


def job_overrides(found: list[Difference]) -> list[str]:
    """The list's Hydra overrides, appended to every training VM's job."""
    return [f"{d.key}={d.local}" for d in found if d.kind == JOB]


def attributes(found: list[Difference]) -> dict[str, str]:
    """The list's instance attributes, the same on every VM."""
    return {d.key: d.local for d in found if d.kind == METADATA}
