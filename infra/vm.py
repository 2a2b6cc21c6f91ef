"""What a VM is told through its instance metadata: the contract with startup/startup.sh, which
reads the `spot-*` keys, installs the release and starts the job. Kept free of the provider
bindings so it can be read and tested on its own."""

from __future__ import annotations

from harness.config import ConfigError
from infra.settings import NodeSettings, Settings

PD_DEVICE = "checkpoint-pd"  # the master's checkpoint disk: /dev/disk/by-id/google-checkpoint-pd
SCRIPTS = {"startup-script": "startup.sh", "shutdown-script": "shutdown.sh"}
HARDENING = {"enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE", "serial-port-enable": "FALSE"}


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


def job_overrides(settings: Settings) -> list[str]:
    """The Hydra overrides the job on every VM gets: Cloud Monitoring on (the alert policies watch it)
    and this topology's cost basis, then the command line's overrides (which win)."""
    w = settings.topology.workers
    spot = w.max if w.provisioning == "SPOT" else 0
    on_demand = w.max - spot + (1 if settings.master_trains else 0)
    return [
        "telemetry.monitoring.enabled=true", f"telemetry.monitoring.project={settings.infra.project}",
        f"telemetry.cost_basis.machine_type={w.machine_type}",
        f"telemetry.cost_basis.gpu_type={w.gpu_type or 'null'}", f"telemetry.cost_basis.gpus_per_node={w.gpu_count}",
        f"telemetry.cost_basis.spot_nodes={spot}", f"telemetry.cost_basis.on_demand_nodes={on_demand}",
        *settings.overrides,
    ]


def metadata(settings: Settings, role: str, node: NodeSettings, *, scripts: dict[str, str], rdzv_endpoint: str,
             bucket: str, release: str, checkpoint_disk: bool) -> dict[str, str]:
    """The metadata of a `role` node (master | worker | coordinator). Every value is a literal and
    escaped, except `rdzv_endpoint` and `bucket`: Terraform references that must stay interpolations."""
    meta = {**scripts, **HARDENING, "spot-role": role, "spot-release": release,
            # The preflight: the VM booted the Python the wheelhouse was built for, and sees its GPUs.
            "spot-python": settings.infra.image.python, "spot-gpu-count": str(node.gpu_count)}
    references = {"spot-rdzv-endpoint": rdzv_endpoint, "spot-bucket": bucket}
    if role == "coordinator":
        return {**{k: literal(v) for k, v in meta.items()}, **references}
    lo, hi = settings.trainer_nodes()
    meta |= {
        "spot-run-id": settings.run_id,
        "spot-nnodes": str(hi) if lo == hi else f"{lo}:{hi}",
        "spot-nproc-per-node": str(node.gpu_count or settings.nproc_per_node),
        "spot-health-port": str(settings.health_port),
        "spot-hydra-overrides": " ".join(job_overrides(settings)),
    }
    if settings.wandb_online:  # otherwise the VM must not try to read a secret that may have no value
        meta["spot-wandb-secret"] = settings.infra.wandb_secret
    if checkpoint_disk:
        meta["spot-pd-device"] = f"/dev/disk/by-id/google-{PD_DEVICE}"
    return {**{k: literal(v) for k, v in meta.items()}, **references}
