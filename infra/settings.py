"""The infrastructure's settings: the `infra` and `topology` groups of the same Hydra config tree the
training job reads, typed by the dataclasses below and checked before anything is synthesized.

Every error is a ConfigError naming the key and what is allowed, e.g.
`topology.workers.gpu_type='nvidia-a100-80gb' cannot run on a2-highgpu-1g; allowed: nvidia-tesla-a100 x1`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from harness import config as job_config
from harness.bucket_names import bucket_name_problem
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
# run.name: one folder name, or <sweep>/<job> (harness/sweep/); startup/startup.sh checks the same pattern.
RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"


@dataclass
class NetworkSettings:
    cidr: str = "10.10.0.0/20"
    # NCCL and gloo pick ephemeral ports: open these between training nodes only.
    collective_ports: list[str] = field(default_factory=lambda: ["1024-65535"])
    inter_zone_usd_per_gb: float = 0.01  # what the synth warning quotes for traffic between zones


@dataclass
class ImageSettings:
    """A pinned boot image and what it brings. Recorded from the image's release notes, because synth
    cannot ask the image: the wheelhouse is built for `python` and `glibc`, and the VM's preflight
    checks that it booted this Python."""

    project: str = MISSING
    name: str = MISSING  # an image name, never a family
    python: str = MISSING  # major.minor of its python3
    glibc: str = MISSING  # major.minor
    cuda: str | None = None
    driver: str | None = None
    torch: str | None = None  # the torch version the image brings; None when it brings none

    @property
    def self_link(self) -> str:
        return f"projects/{self.project}/global/images/{self.name}"


@dataclass
class WheelhouseSettings:
    torch: bool = True  # the release carries the pinned torch of requirements.txt
    cache_dir: str = "infra/wheelhouse"


@dataclass
class BucketSettings:
    name: str = MISSING
    versioning: bool = False
    data_access_logs: bool = True  # Cloud Audit Logs (Data Access) for Cloud Storage in the project
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
    absent_min: int = 30
    log_metric_wait_s: int = 600


@dataclass
class HealthCheckSettings:
    interval_s: int = 30
    timeout_s: int = 10
    unhealthy_threshold: int = 3
    initial_delay_s: int = 900


@dataclass
class LogsSettings:
    """The job's logs in Cloud Logging (infra/logs.py): the Ops Agent on each VM ships the job's journal."""

    enabled: bool = True
    # A google-cloud-ops-agent .deb for the image's OS, for an image without the agent: the release
    # carries it and startup.sh installs it with dpkg (no package repository at boot). None: the image
    # must bring the agent, or the logs stay in the VM's journal.
    agent_package: str | None = None


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
    image: ImageSettings = field(default_factory=ImageSettings)
    wheelhouse: WheelhouseSettings = field(default_factory=WheelhouseSettings)
    boot_disk_gb: int = 200
    secure_boot: bool = False
    instance_termination_action: str = "DELETE"
    wandb_secret: str = "wandb-api-key"
    create_wandb_secret: bool = True
    network: NetworkSettings = field(default_factory=NetworkSettings)
    bucket: BucketSettings = field(default_factory=BucketSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    logs: LogsSettings = field(default_factory=LogsSettings)


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
    zones: list[str] | None = None  # None: the master's zone when it trains, else infra.zones


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

    def worker_zones(self) -> list[str]:
        """The zones the worker MIG may use: topology.workers.zones, else the master's zone when the
        master trains (collectives stay in one zone), else every zone of infra.zones."""
        if self.topology.workers.zones is not None:
            return list(self.topology.workers.zones)
        return [self.infra.zones[0]] if self.master_trains else list(self.infra.zones)

    def trainer_nodes(self) -> tuple[int, int]:
        """(min, max) nodes that train: the workers, plus the master when it trains."""
        extra = 1 if self.master_trains else 0
        return self.topology.workers.min + extra, self.topology.workers.max + extra

    def path(self, value: str) -> Path:
        """A configured path; relative ones are relative to the repository root, not the cwd."""
        p = Path(value)
        return p if p.is_absolute() else REPO / p


def requires_python() -> str:
    """pyproject.toml's requires-python: the one statement of which Python the harness runs on."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]


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


def _zones(key: str, zones: Sequence[str], region: str) -> None:
    if not zones:
        raise ConfigError(f"{key} is empty; give at least one zone of infra.region={region!r}")
    for n, zone in enumerate(zones):
        if not re.fullmatch(rf"{re.escape(region)}-[a-z]", zone):
            raise ConfigError(f"{key}[{n}]={zone!r} is outside infra.region={region!r}; "
                              f"allowed: zones of {region}, e.g. {region}-a, {region}-b")
    if len(set(zones)) != len(zones):
        raise ConfigError(f"{key}={list(zones)} lists a zone twice")


def _image(i: InfraSettings) -> None:
    """A pinned image whose Python can run the harness, and exactly one source of torch."""
    img = i.image
    _matches("infra.image.project", img.project, r"[a-z][a-z0-9-]{4,61}[a-z0-9]", "a project id")
    _matches("infra.image.name", img.name, r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
             "an image name (not a path, not a family: `gcloud compute images list --project "
             f"{img.project}` shows the dated names)")
    for key in ("python", "glibc"):
        _matches(f"infra.image.{key}", getattr(img, key), r"\d+\.\d+", "major.minor, e.g. 3.12")
    spec = requires_python()
    try:
        compatible = SpecifierSet(spec).contains(img.python)
    except InvalidSpecifier:
        raise ConfigError(f"pyproject.toml requires-python={spec!r} is not a version specifier") from None
    if not compatible:
        raise ConfigError(f"infra.image.python={img.python!r} ({img.name}) does not satisfy pyproject.toml's "
                          f"requires-python {spec!r}; allowed: an image whose python3 satisfies {spec!r}")
    if img.torch is None and not i.wheelhouse.torch:
        raise ConfigError(f"no torch on the VMs: infra.image.torch=null ({img.name} brings none) and "
                          "infra.wheelhouse.torch=false; allowed: infra.wheelhouse.torch=true, or an image "
                          "that brings torch with infra.image.torch=<its version>")
    if img.torch is not None and i.wheelhouse.torch:
        raise ConfigError(f"torch twice: infra.image.torch={img.torch!r} and infra.wheelhouse.torch=true; "
                          "allowed: one of them (the release's venv would shadow the image's torch)")


AGENT_PACKAGE = r"google-cloud-ops-agent_[A-Za-z0-9.+~:-]+_amd64\.deb"


def _logs(s: Settings) -> None:
    """An agent package, when given, is a google-cloud-ops-agent .deb that exists here (make deploy
    publishes it with the release)."""
    package = s.infra.logs.agent_package
    if package is None:
        return
    path = s.path(package)
    if not re.fullmatch(AGENT_PACKAGE, path.name):
        raise ConfigError(f"infra.logs.agent_package={package!r} is not an Ops Agent package; allowed: a file "
                          "named google-cloud-ops-agent_<version>_amd64.deb (`apt-get download "
                          "google-cloud-ops-agent` on the image's OS with Google's repository), or null")
    if not path.is_file():
        raise ConfigError(f"infra.logs.agent_package={package!r}: {path} does not exist; download it first, or "
                          "leave infra.logs.agent_package out (the image must then bring the Ops Agent)")


def warnings(s: Settings) -> list[str]:
    """What synth and deploy point out without refusing: choices that cost money or hide problems."""
    found = []
    zones = s.worker_zones()
    training_zones = set(zones) | ({s.infra.zones[0]} if s.master_trains else set())
    spread = s.topology.workers.distribution != "ANY_SINGLE_ZONE" and len(zones) > 1
    if len(training_zones) > 1 and (spread or s.master_trains):
        found.append(f"training nodes may run in different zones ({', '.join(sorted(training_zones))}): "
                     f"every all-reduce between them is billed ${s.infra.network.inter_zone_usd_per_gb:g}/GB "
                     f"and is slower; keep them in one zone with topology.workers.zones=[{s.infra.zones[0]}]")
    if s.infra.logs.enabled and s.infra.logs.agent_package is None:
        found.append(f"the VMs ship their logs to Cloud Logging only if {s.infra.image.name} brings the Ops "
                     "Agent (startup.sh logs `ops agent: not installed` otherwise); to carry it in the release: "
                     "'infra.logs.agent_package=\"<path>/google-cloud-ops-agent_<version>_amd64.deb\"'")
    if not s.infra.alerts.emails:
        found.append("no notification channel: every alert policy notifies nobody; set "
                     "infra.alerts.emails=[you@example.com]")
    return found


def validate(s: Settings) -> None:
    """Every check that types cannot express; raises ConfigError naming the key and the allowed values."""
    i, t = s.infra, s.topology
    _matches("infra.project", i.project, r"[a-z][a-z0-9-]{4,28}[a-z0-9]",
             "6-30 lowercase letters, digits or '-', starting with a letter")
    _matches("infra.name", i.name, r"[a-z][a-z0-9-]{0,18}[a-z0-9]",
             "2-20 lowercase letters, digits or '-', starting with a letter (it prefixes every resource name)")
    _matches("infra.region", i.region, r"[a-z]+-[a-z]+[0-9]+", "a region such as us-central1")
    _zones("infra.zones", i.zones, i.region)
    for key, value in i.labels.items():
        _matches(f"infra.labels.{key}", key, r"[a-z][a-z0-9_-]{0,62}", "label keys: lowercase letters, "
                 "digits, '_' or '-', starting with a letter")
        _matches(f"infra.labels.{key}", str(value), r"[a-z0-9_-]{0,63}",
                 "label values: up to 63 lowercase letters, digits, '_' or '-'")
    one_of("infra.instance_termination_action", i.instance_termination_action, TERMINATION_ACTIONS)
    _image(i)
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
    if not 2 <= a.absent_min <= 1440:  # Cloud Monitoring's range for a metric-absence duration
        raise ConfigError(f"infra.alerts.absent_min={a.absent_min} is not allowed; use 2-1440 (minutes)")
    _at_least("infra.alerts.log_metric_wait_s", a.log_metric_wait_s, 0)
    _logs(s)
    if i.network.inter_zone_usd_per_gb < 0:
        raise ConfigError(f"infra.network.inter_zone_usd_per_gb={i.network.inter_zone_usd_per_gb} must be >= 0")
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
    if w.zones is not None:
        _zones("topology.workers.zones", w.zones, i.region)
    _node("topology.master", m)
    _node("topology.workers", w)
    if m.role == "rendezvous" and m.checkpoint_disk_gb:
        raise ConfigError(f"topology.master.checkpoint_disk_gb={m.checkpoint_disk_gb}: a rendezvous-only "
                          "master keeps no checkpoints; allowed: 0")
    _at_least("topology.master.checkpoint_disk_gb", m.checkpoint_disk_gb, 0)
    _matches("run.name", s.run_id, RUN_NAME,
             "letters, digits, '.', '_' or '-', and at most one '/' between two such names, as a sweep's "
             "jobs have (<sweep>/<index>-...): it names the run's folder in the bucket")
    for override in s.overrides:
        if re.search(r"\s", override):
            raise ConfigError(f"override {override!r} holds whitespace; the VMs receive the overrides "
                              "space-separated, so values must not contain spaces")
