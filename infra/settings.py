"""The infrastructure's settings: the `infra` and `topology` groups of the same Hydra config tree the
training job reads, typed by the dataclasses below and checked before anything is synthesized.

Every error is a ConfigError naming the key and what is allowed, e.g.
`topology.workers.gpu_type='nvidia-a100-80gb' cannot run on a2-highgpu-1g; allowed: nvidia-tesla-a100 x1`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from harness import config as job_config
from harness.config import ConfigError, one_of, structured
from infra import machines

REPO = Path(__file__).resolve().parent.parent
# The default project in conf/infra/default.yaml: synth accepts it, plan/deploy/destroy refuse it.
PLACEHOLDER_PROJECT = "my-gcp-project"
PROVISIONING = ("SPOT", "STANDARD")
TERMINATION_ACTIONS = ("STOP", "DELETE")
# Regional MIG target shapes: ANY_SINGLE_ZONE keeps every worker in one zone (collective bandwidth);
# BALANCED / ANY / EVEN spread them over infra.zones (capacity).
DISTRIBUTIONS = ("ANY_SINGLE_ZONE", "BALANCED", "ANY", "EVEN")
MASTER_ROLES = ("trainer", "rendezvous")


@dataclass
class NetworkSettings:
    cidr: str = "10.10.0.0/20"
    # NCCL and gloo pick ephemeral ports: open these between training nodes only.
    collective_ports: list[str] = field(default_factory=lambda: ["1024-65535"])


@dataclass
class BucketSettings:
    name: str = MISSING
    versioning: bool = False
    soft_delete_days: int = 0  # 0 (off) or 7-90
    tmp_delete_after_days: int = 1
    nearline_after_days: int = 30
    force_destroy: bool = False


@dataclass
class AlertSettings:
    emails: list[str] = field(default_factory=list)
    goodput_below: float = 0.8
    goodput_window_min: int = 30
    preemptions_per_hour: int = 6
    stall_min: int = 30


@dataclass
class HealthCheckSettings:
    interval_s: int = 30
    timeout_s: int = 10
    unhealthy_threshold: int = 3
    initial_delay_s: int = 900


@dataclass
class InfraSettings:
    project: str = MISSING
    region: str = MISSING
    zones: list[str] = MISSING
    name: str = "spot-train"
    labels: dict[str, str] = field(default_factory=dict)
    state_bucket: str | None = None
    outdir: str = "infra/cdktf.out"
    startup_dir: str = "startup"
    image: str = MISSING
    boot_disk_gb: int = 200
    secure_boot: bool = False
    instance_termination_action: str = "DELETE"
    wandb_secret: str = "wandb-api-key"
    create_wandb_secret: bool = True
    network: NetworkSettings = field(default_factory=NetworkSettings)
    bucket: BucketSettings = field(default_factory=BucketSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)


@dataclass
class NodeSettings:
    machine_type: str = MISSING
    gpu_type: str | None = None
    gpu_count: int = 0
    local_ssd_count: int = 0


@dataclass
class MasterSettings(NodeSettings):
    role: str = "trainer"  # trainer: trains and hosts the rendezvous; rendezvous: hosts only the store
    checkpoint_disk_gb: int = 0  # persistent disk for the persistent checkpoint tier (trainer only)


@dataclass
class WorkerSettings(NodeSettings):
    provisioning: str = "SPOT"
    min: int = 1
    max: int = 4
    distribution: str = "ANY_SINGLE_ZONE"


@dataclass
class TopologySettings:
    name: str = MISSING
    master: MasterSettings = field(default_factory=MasterSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)


@dataclass(frozen=True)
class Settings:
    """Everything a stack needs: both groups plus the job settings the VMs must agree with."""

    infra: InfraSettings
    topology: TopologySettings
    run_id: str  # run.name: where the job's checkpoints live in the bucket
    health_port: int  # health.port: the harness's /healthz
    rdzv_port: int  # the port of launch.rdzv_endpoint
    nproc_per_node: int  # launch.nproc_per_node, for nodes without GPUs
    wandb_online: bool  # wandb.mode == online: the VMs then read the W&B key from Secret Manager
    overrides: tuple[str, ...]  # the command line's Hydra overrides, replayed by the job on every VM
    cost: dict[str, Any]  # the `cost` group (price table)

    @property
    def master_trains(self) -> bool:
        return self.topology.master.role == "trainer"

    def trainer_nodes(self) -> tuple[int, int]:
        """(min, max) nodes that train: the workers, plus the master when it trains."""
        extra = 1 if self.master_trains else 0
        return self.topology.workers.min + extra, self.topology.workers.max + extra

    def path(self, value: str) -> Path:
        """A configured path; relative ones are relative to the repository root, not the cwd."""
        p = Path(value)
        return p if p.is_absolute() else REPO / p


def load(overrides: Sequence[str] = ()) -> Settings:
    """Compose conf/ with the overrides (exactly as the job does), type and validate the infra part."""
    cfg: DictConfig = job_config.load(list(overrides))
    endpoint = str(cfg.launch.rdzv_endpoint)
    port = endpoint.rsplit(":", 1)[-1]
    if not port.isdigit():
        raise ConfigError(f"launch.rdzv_endpoint={endpoint!r} must be host:port")
    settings = Settings(
        infra=structured(InfraSettings, cfg.get("infra"), "infra"),
        topology=structured(TopologySettings, cfg.get("topology"), "topology"),
        run_id=str(cfg.run.name),
        health_port=int(cfg.health.port),
        rdzv_port=int(port),
        nproc_per_node=int(cfg.launch.nproc_per_node),
        wandb_online=cfg.wandb.mode == "online",
        overrides=tuple(overrides),
        cost=OmegaConf.to_container(cfg.cost) if cfg.get("cost") is not None else {},  # type: ignore[arg-type]
    )
    validate(settings)
    return settings


# --- validation -----------------------------------------------------------------------------------

def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _matches(key: str, value: str, pattern: str, what: str) -> None:
    if not re.fullmatch(pattern, value):
        raise ConfigError(f"{key}={value!r} is not valid: {what}")


def bucket_name_problem(name: str) -> str | None:
    """Why GCS would reject this bucket name, or None (cloud.google.com/storage/docs/buckets#naming)."""
    parts = name.split(".")
    if not (3 <= len(name) <= (222 if len(parts) > 1 else 63)) or any(len(p) > 63 for p in parts):
        return "3-63 characters (up to 222 with dots, at most 63 between dots)"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", name):
        return "only lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    if ".." in name or ".-" in name or "-." in name:
        return "no '..', '.-' or '-.'"
    if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", name):
        return "not an IP address"
    if name.startswith("goog") or re.search(r"g[o0]{2}gle", name):
        return "must not start with 'goog' or contain 'google' (or close misspellings)"
    return None


def _bucket_name(key: str, name: str) -> None:
    problem = bucket_name_problem(name)
    if problem:
        raise ConfigError(f"{key}={name!r} is not a valid GCS bucket name: {problem}")


def _node(key: str, node: NodeSettings) -> None:
    """The machine type exists in the table and can carry the GPUs and Local SSDs asked for."""
    shape = machines.shape(node.machine_type)
    if shape is None:
        raise ConfigError(f"{key}.machine_type={node.machine_type!r} is not in infra/machines.py; "
                          f"known: {machines.KNOWN}")
    gpus = machines.allowed_gpus(shape)
    if node.gpu_count == 0 and node.gpu_type is None:
        if shape.gpu_type:
            raise ConfigError(f"{key}.gpu_count=0: {node.machine_type} has {shape.gpu_count} {shape.gpu_type} "
                              f"built in; set {key}.gpu_type={shape.gpu_type} {key}.gpu_count={shape.gpu_count}")
    else:
        allowed = "; ".join(f"{t} x{','.join(map(str, c))}" for t, c in gpus.items()) or "none (no GPUs)"
        if node.gpu_type not in gpus:
            raise ConfigError(f"{key}.gpu_type={node.gpu_type!r} cannot run on {node.machine_type}; "
                              f"allowed: {allowed}")
        if node.gpu_count not in gpus[node.gpu_type]:
            raise ConfigError(f"{key}.gpu_count={node.gpu_count} is not allowed for {node.gpu_type} on "
                              f"{node.machine_type}; allowed: {allowed}")
    if node.local_ssd_count not in shape.local_ssds:
        bundled = " (attached automatically with this machine type)" if shape.local_ssd_bundled else ""
        raise ConfigError(f"{key}.local_ssd_count={node.local_ssd_count} is not allowed on {node.machine_type}; "
                          f"allowed: {', '.join(map(str, shape.local_ssds))}{bundled}")


def validate(s: Settings) -> None:
    """Every check that types cannot express; raises ConfigError naming the key and the allowed values."""
    i, t = s.infra, s.topology
    _matches("infra.project", i.project, r"[a-z][a-z0-9-]{4,28}[a-z0-9]",
             "6-30 lowercase letters, digits or '-', starting with a letter")
    _matches("infra.name", i.name, r"[a-z][a-z0-9-]{0,18}[a-z0-9]",
             "2-20 lowercase letters, digits or '-', starting with a letter (it prefixes every resource name)")
    _matches("infra.region", i.region, r"[a-z]+-[a-z]+[0-9]+", "a region such as us-central1")
    if not i.zones:
        raise ConfigError("infra.zones is empty; give at least one zone of infra.region")
    for n, zone in enumerate(i.zones):
        if not re.fullmatch(rf"{re.escape(i.region)}-[a-z]", zone):
            raise ConfigError(f"infra.zones[{n}]={zone!r} is outside infra.region={i.region!r}; "
                              f"allowed: zones of {i.region}, e.g. {i.region}-a, {i.region}-b")
    if len(set(i.zones)) != len(i.zones):
        raise ConfigError(f"infra.zones={i.zones} lists a zone twice")
    for key, value in i.labels.items():
        _matches(f"infra.labels.{key}", key, r"[a-z][a-z0-9_-]{0,62}", "label keys: lowercase letters, "
                 "digits, '_' or '-', starting with a letter")
        _matches(f"infra.labels.{key}", str(value), r"[a-z0-9_-]{0,63}",
                 "label values: up to 63 lowercase letters, digits, '_' or '-'")
    one_of("infra.instance_termination_action", i.instance_termination_action, TERMINATION_ACTIONS)
    _at_least("infra.boot_disk_gb", i.boot_disk_gb, 50)
    _matches("infra.wandb_secret", i.wandb_secret, r"[A-Za-z0-9_-]{1,255}",
             "a Secret Manager secret id: letters, digits, '_' or '-'")
    _bucket_name("infra.bucket.name", i.bucket.name)
    if i.state_bucket is not None:
        _bucket_name("infra.state_bucket", i.state_bucket)
    sd = i.bucket.soft_delete_days
    if not (sd == 0 or 7 <= sd <= 90):
        raise ConfigError(f"infra.bucket.soft_delete_days={sd} is not allowed; use 0 (off) or 7-90")
    _at_least("infra.bucket.tmp_delete_after_days", i.bucket.tmp_delete_after_days, 1)
    _at_least("infra.bucket.nearline_after_days", i.bucket.nearline_after_days, 1)
    for n, ports in enumerate(i.network.collective_ports):
        lo, _, hi = str(ports).partition("-")
        if not (lo.isdigit() and (not hi or hi.isdigit()) and 1 <= int(lo) <= int(hi or lo) <= 65535):
            raise ConfigError(f"infra.network.collective_ports[{n}]={ports!r} must be a port or a range "
                              "'LOW-HIGH' within 1-65535")
    a = i.alerts
    if not 0 < a.goodput_below <= 1:
        raise ConfigError(f"infra.alerts.goodput_below={a.goodput_below} must be in (0, 1]")
    for key in ("goodput_window_min", "preemptions_per_hour", "stall_min"):
        _at_least(f"infra.alerts.{key}", getattr(a, key), 1)
    for n, email in enumerate(a.emails):
        _matches(f"infra.alerts.emails[{n}]", email, r"[^@\s]+@[^@\s]+\.[^@\s]+", "an email address")

    m, w = t.master, t.workers
    one_of("topology.master.role", m.role, MASTER_ROLES)
    one_of("topology.workers.provisioning", w.provisioning, PROVISIONING)
    one_of("topology.workers.distribution", w.distribution, DISTRIBUTIONS)
    _at_least("topology.workers.min", w.min, 0 if s.master_trains else 1)
    _at_least("topology.workers.max", w.max, 1)
    if w.min > w.max:
        raise ConfigError(f"topology.workers.min={w.min} > topology.workers.max={w.max}; "
                          f"allowed: 0 <= min <= max")
    _node("topology.master", m)
    _node("topology.workers", w)
    if m.role == "rendezvous" and m.checkpoint_disk_gb:
        raise ConfigError(f"topology.master.checkpoint_disk_gb={m.checkpoint_disk_gb}: a rendezvous-only "
                          "master keeps no checkpoints; allowed: 0")
    _at_least("topology.master.checkpoint_disk_gb", m.checkpoint_disk_gb, 0)
    _matches("run.name", s.run_id, r"[A-Za-z0-9][A-Za-z0-9._-]*",
             "letters, digits, '.', '_' or '-' (it names the run's folder in the bucket)")
    for override in s.overrides:
        if re.search(r"\s", override):
            raise ConfigError(f"override {override!r} holds whitespace; the VMs receive the overrides "
                              "space-separated, so values must not contain spaces")
