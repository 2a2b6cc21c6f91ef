"""What a VM is told through its instance metadata: the contract with startup/startup.sh, which
reads the `spot-*` keys, installs the release and starts the job. Kept free of the provider
bindings (and of torch), so the local Spot cloud builds its VMs' metadata with the same code."""

from __future__ import annotations

from dataclasses import dataclass

from harness import job_end
from harness.config import ConfigError
from infra import logs
from infra.settings import NodeSettings, Settings

PD_DEVICE = "checkpoint-pd"  # the master's checkpoint disk: /dev/disk/by-id/google-checkpoint-pd
SCRIPTS = {"startup-script": "startup.sh", "shutdown-script": "shutdown.sh"}
HARDENING = {"enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE", "serial-port-enable": "FALSE"}
REFERENCES = ("spot-rdzv-endpoint", "spot-bucket")  # Terraform references in a template: never escaped


@dataclass(frozen=True)
class Group:
    """One kind of VM of the topology and how many of it the deployment keeps: the hybrid master
    (trains; its agent hosts the c10d store) or the all-Spot coordinator (hosts only the store), and
    the workers."""

    role: str  # spot-role: master | worker | coordinator
    node: NodeSettings
    spot: bool
    size: int  # the instance group's target size
    checkpoint_disk_gb: int = 0


def groups(settings: Settings) -> tuple[Group, Group]:
    """(the master or coordinator, the workers) of settings.topology."""
    t = settings.topology
    if settings.master_trains:
        master = Group("master", t.master, spot=False, size=1, checkpoint_disk_gb=t.master.checkpoint_disk_gb)
    else:
        master = Group("coordinator", t.master, spot=False, size=1)
    return master, Group("worker", t.workers, spot=t.workers.provisioning == "SPOT", size=t.workers.max)


def group_name(settings: Settings, group: Group) -> str:
    """The name of `group`'s instance group (the master's is also its one instance's name):
    `<infra.name>-master`, `-coordinator` or `-workers`."""
    return f"{settings.infra.name}-{'workers' if group.role == 'worker' else group.role}"


def group_paths(settings: Settings) -> dict[str, str]:
    """Each instance group's resource path by role, workers first: what a training VM resizes to 0 at
    the job's end (harness/job_end.py, through the `spot-instance-groups` key), and what `make deploy`
    brings back. The master's zonal group lives in infra.zones[0], the workers' regional one in infra.region."""
    i = settings.infra
    master, workers = groups(settings)
    return {workers.role: job_end.group_path(i.project, group_name(settings, workers), region=i.region),
            master.role: job_end.group_path(i.project, group_name(settings, master), zone=i.zones[0])}


def literal(value: str) -> str:
    """`value` as a Terraform string that means exactly these characters: the template sequences
    escaped (`${` -> `$${`, `%{` -> `%%{`), so neither a script nor an override is read as an
    interpolation or a directive."""
    return value.replace("${", "$${").replace("%{", "%%{")


def startup_scripts(settings: Settings) -> dict[str, str]:
    """The VM scripts from infra.startup_dir, exact bytes (metadata() escapes every literal value)."""
    folder = settings.path(settings.infra.startup_dir)
    scripts = {}
    for key, name in SCRIPTS.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"infra.startup_dir={settings.infra.startup_dir!r}: {path} is missing; the "
                              "VM scripts (startup.sh, shutdown.sh) are read from there at synth time")
        scripts[key] = path.read_bytes().decode("utf-8")
    return scripts


def job_overrides(settings: Settings, role: str) -> list[str]:
    """The Hydra overrides the job on a `role` VM gets: Cloud Monitoring on (the alert policies watch
    it), this topology's cost basis, which agent hosts the c10d store, then the command line's
    overrides (which win). The host is named rather than left to torchrun's guess from the endpoint's
    address: the hybrid master's agent hosts it; a worker never does (in all_spot the coordinator's
    `harness.rendezvous` does), so a restarting master can never find its port taken by a worker."""
    w = settings.topology.workers
    spot = w.max if w.provisioning == "SPOT" else 0
    on_demand = w.max - spot + (1 if settings.master_trains else 0)
    return [
        "telemetry.monitoring.enabled=true", f"telemetry.monitoring.project={settings.infra.project}",
        f"telemetry.cost_basis.machine_type={w.machine_type}",
        f"telemetry.cost_basis.gpu_type={w.gpu_type or 'null'}", f"telemetry.cost_basis.gpus_per_node={w.gpu_count}",
        f"telemetry.cost_basis.spot_nodes={spot}", f"telemetry.cost_basis.on_demand_nodes={on_demand}",
        f"launch.rdzv_conf='is_host={'true' if role == 'master' else 'false'}'",
        *settings.overrides,
    ]


def attributes(settings: Settings, group: Group, *, rdzv_endpoint: str, bucket: str, release: str) -> dict[str, str]:
    """The hardening keys and the `spot-*` keys of a VM of `group`, as the VM reads them."""
    role, node = group.role, group.node
    meta = {**HARDENING, "spot-role": role, "spot-release": release,
            "spot-rdzv-endpoint": rdzv_endpoint, "spot-bucket": bucket,
            # The preflight: the VM booted the Python the wheelhouse was built for, and sees its GPUs.
            "spot-python": settings.infra.image.python, "spot-gpu-count": str(node.gpu_count),
            "spot-run-id": settings.run_id}  # the coordinator reopens this run's rendezvous
    if settings.infra.logs.enabled:  # startup.sh hands it to the Ops Agent (infra/logs.py)
        meta[logs.CONFIG_KEY] = logs.agent_config(settings, role)
    if role == "coordinator":
        return meta
    lo, hi = settings.trainer_nodes()
    meta |= {
        "spot-nnodes": str(hi) if lo == hi else f"{lo}:{hi}",
        "spot-nproc-per-node": str(node.gpu_count or settings.nproc_per_node),
        "spot-health-port": str(settings.health_port),
        "spot-hydra-overrides": " ".join(job_overrides(settings, role)),
        job_end.GROUPS_KEY: job_end.format_groups(group_paths(settings).values()),
    }
    if settings.wandb_online:  # otherwise the VM must not try to read a secret that may have no value
        meta["spot-wandb-secret"] = settings.infra.wandb_secret
    if group.checkpoint_disk_gb:
        meta["spot-pd-device"] = f"/dev/disk/by-id/google-{PD_DEVICE}"
    return meta


def metadata(settings: Settings, group: Group, *, scripts: dict[str, str], rdzv_endpoint: str, bucket: str,
             release: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An instance template's metadata: the scripts, attributes() and `extra` (a sweep's queue), every
    value a literal and escaped, except `rdzv_endpoint` and `bucket`: Terraform references that must
    stay interpolations."""
    meta = {**scripts, **attributes(settings, group, rdzv_endpoint=rdzv_endpoint, bucket=bucket, release=release),
            **(extra or {})}
    return {k: v if k in REFERENCES else literal(v) for k, v in meta.items()}
