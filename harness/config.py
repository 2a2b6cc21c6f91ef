"""Structured configs for every Hydra group, and the checks that run before anything trains.

One dataclass per group, registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
wrong type or an unknown key fails at compose time with a message naming the key. Checks that span
keys (divisibility, ranges) live in `validate`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from harness.batching import BatchSplitError, check_every_world_size, max_nodes

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra and OmegaConf are imported where they are used, so the schemas below (plain dataclasses) are
# importable where neither is installed (the GPU benchmark, on the GPU machine's own torch).

# The repo's conf/ in a checkout; on a VM the startup script points SPOT_CONF_DIR at the released copy.
CONF_DIR = Path(os.environ.get("SPOT_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting: the message names the key and what is allowed."""


@dataclass
class RunConfig:
    name: str = "default"  # a sweep's jobs: <sweep>/<index>-<short overrides> (harness/sweep/)
    dir: str = "runs/${run.name}"


def rdzv_id(run_name: str) -> str:
    """torchrun's --rdzv-id for a run (harness/launch.py; harness/rendezvous.py watches the same): the
    name with '/' as '.', since torchrun names a log directory after it."""
    return run_name.replace("/", ".")


FSDP_DTYPES = ("bfloat16", "float16", "float32")  # torch dtype names (this module does not import torch)


@dataclass
class FSDPConfig:
    """train.parallelism=fsdp (harness/parallel.py)."""

    shard_modules: list[str] = field(default_factory=list)  # block class names; [] = every ModuleList element
    param_dtype: str = "bfloat16"  # on GPU; CPU runs stay fp32
    reduce_dtype: str = "float32"


@dataclass
class TrainConfig:
    max_steps: int = 200
    global_batch_size: int = 16
    # Micro-batches per optimizer step on each rank; None derives it from micro_batch_size.
    grad_accum: int | None = None
    # Samples per forward pass on one rank; 0 means the rank's whole share in one pass.
    micro_batch_size: int = 0
    grad_clip: float = 1.0
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda
    parallelism: str = "ddp"  # ddp | fsdp (harness/parallel.py)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # Append each step's global sample indices to ${run.dir}/samples/ (an audit of the data stream).
    audit_samples: bool = True  # `step first stop` per step and rank in ${run.dir}/samples/ (a line a step)


@dataclass
class GPTConfig:
    _target_: str = "harness.models.gpt.GPT"
    vocab_size: int = "${data.vocab_size}"  # type: ignore[assignment]
    block_size: int = "${data.block_size}"  # type: ignore[assignment]
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


@dataclass
class HFModelConfig:
    """model=hf: a Hugging Face causal LM built from its config alone (harness/models/hf.py)."""

    _target_: str = "harness.models.hf.causal_lm"
    model_type: str = "???"  # a transformers model type: gpt2, llama, qwen2, mistral, ...
    vocab_size: int = "${data.vocab_size}"  # type: ignore[assignment]
    block_size: int = "${data.block_size}"  # type: ignore[assignment]  # max_position_embeddings
    config: dict[str, Any] = field(default_factory=dict)  # the model type's config keys, e.g. num_hidden_layers


@dataclass
class DataConfig:
    _target_: str = "harness.data.synthetic.SyntheticTokens"
    vocab_size: int = 256
    block_size: int = 64
    # data=tokens: one uint16 token file, or `paths`, shards read in order; local paths or gs:// URLs.
    path: str | None = None
    paths: list[str] = field(default_factory=list)
    # Where gs:// files are copied once per VM (${run.dir} is on the local SSD on GCP), then memory-mapped.
    cache_dir: str = "${run.dir}/data"
    download_threads: int = 8  # parallel ranged downloads
    download_chunk_mb: float = 32.0  # the unit of a ranged download and of its resumption after a kill
    # A process that waits for another one on its node to fill the cache gives up when the cache has
    # made no progress for this long.
    download_stall_s: float = 600.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95


@dataclass
class TierConfig:
    """A slower checkpoint tier, filled by copying checkpoints committed in the first tier."""

    url: str = "???"
    name: str = ""
    every: int = 1  # promote every Nth checkpoint of the first tier
    every_seconds: float = 0.0  # ...or when this long has passed since the last promotion (0 = off)
    keep: int = 3
    ephemeral: bool = False
    assumed_bandwidth_mb_s: float = 0.0  # before the first copy is measured; 0: checkpoint's value


@dataclass
class CheckpointConfig:
    # The fastest tier; later tiers are filled by copying its committed files.
    store: str = "${run.dir}/checkpoints"
    interval_steps: Any = 50  # an int, or "auto" (Young/Daly from measured cost and MTBI)
    keep: int = 3
    ephemeral: bool = False  # the store dies with the VM (local SSD): emergency saves go further
    slower_tiers: list[TierConfig] = field(default_factory=list)
    if_busy: str = "wait"  # wait | skip: a save requested while the previous one is in flight
    staging_dir: str = "${run.dir}/staging"  # local directory the writer fills when store is remote
    scratch_dir: str = "${run.dir}/restore"  # where a remote checkpoint is downloaded to restore
    write_threads: int = 4
    remote_retry_s: float = 120.0  # how long transient errors of a remote tier (GCS) are retried
    mtbi_s: float = 3600.0  # expected mean time between interruptions, for interval_steps=auto
    # A tier's speed before its first copy is measured: conservative, so an emergency save never
    # counts on a promotion it cannot finish (also sizes the timeouts of a large restore).
    assumed_bandwidth_mb_s: float = 50.0
    list_retry_s: float = 60.0  # how long restore retries a tier that cannot be listed before failing


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "spot-training"
    entity: str | None = None
    dir: str = "${run.dir}"
    group: str | None = None  # W&B run group: a sweep sets it to the sweep's name on each of its jobs


@dataclass
class LaunchConfig:
    nproc_per_node: int = 2
    nnodes: str = "1"  # "N" or "MIN:MAX"
    rdzv_endpoint: str = "127.0.0.1:29400"
    rdzv_backend: str = "c10d"
    max_restarts: int = 0
    standalone: bool = True
    shutdown_timeout_s: int = 27  # torchrun's SIGTERM -> SIGKILL grace; inside GCP's 30 s
    # torchrun --rdzv-conf, e.g. "is_host=False" when a store outside the agents (harness.rendezvous) hosts it
    rdzv_conf: str = ""
    module: str = "harness.train"  # what torchrun runs on every rank (the chaos baseline runs its own)
    # fork | exec | auto: torchrun forks the workers from its agent (torch already imported: a faster
    # restart) or starts an interpreter for each; auto forks unless the node has NVIDIA GPUs.
    workers: str = "auto"


@dataclass
class PreemptionConfig:
    deadline_s: float = 25.0
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    metadata_watch: bool = True
    # A step in progress when the notice arrives: finish it (then save) or abandon it (save the
    # last completed state).
    in_flight_step: str = "finish"  # finish | abandon


@dataclass
class ElasticConfig:
    lr_scaling: str = "none"  # none | linear | sqrt, when the global batch cannot stay constant
    # When a node is preempted: `wait` for the job to be whole again (torchrun is asked for the most
    # nodes launch.nnodes allows, as both minimum and maximum), or `shrink`: the survivors go on at any
    # size launch.nnodes allows, and torchrun grows the job again when the recreated node joins.
    on_preemption: str = "wait"
    # shrink: how long a round waits for more nodes once the minimum is there (torchrun's last_call_timeout,
    # 30 s by default: every preemption would idle the survivors that long before they go on).
    shrink_last_call_s: int = 5  # whole seconds (torchrun parses it as an int)


@dataclass
class HealthConfig:
    """Bounds per phase (harness/health.py): a VM waits in rendezvous for a recreated peer as long
    as Spot capacity takes, and a restore from the bucket is bounded by its bytes, so both get longer
    bounds than a training step."""

    port: int = 8888
    stall_s: float = 300.0  # training: no step completed for this long
    rendezvous_s: float = 3600.0
    restore_s: float = 1800.0  # starting and restoring
    save_s: float = 900.0
    enabled: bool = True


@dataclass
class MonitoringConfig:
    enabled: bool = False
    project: str | None = None  # GCP project the metrics are written to; required when enabled
    period_s: float = 60.0  # one batched CreateTimeSeries per period
    timeout_s: float = 10.0  # deadline of one request (on the sink's thread, never the loop's)
    endpoint: str | None = None  # host:port of a plain-text gRPC endpoint (a local server); None = Google's API


@dataclass
class CostBasis:
    """What this job runs on, to price it; machine_type null means no cost figures (a local run)."""

    machine_type: str | None = None
    gpu_type: str | None = None
    gpus_per_node: int = 0
    spot_nodes: int = 1
    on_demand_nodes: int = 0


@dataclass
class TelemetryConfig:
    """The goodput ledger and its sinks (harness/telemetry)."""

    ledger_flush_s: float = 5.0  # background ledger writes: the most a SIGKILL loses of the ledger
    job_metrics_s: float = 30.0  # how often rank 0 recomputes goodput and cost from the ledger
    queue_size: int = 10_000  # W&B rows buffered while W&B is slow; more are dropped and counted
    close_timeout_s: float = 5.0  # ledger write, then all sinks together, at exit: keep inside the notice
    retry_initial_s: float = 5.0  # back-off after a sink failure, doubling up to retry_max_s
    retry_max_s: float = 300.0
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    cost_basis: CostBasis = field(default_factory=CostBasis)


MIN_MONITORING_PERIOD_S = 10.0  # Cloud Monitoring takes one point per series every few seconds at most


@dataclass
class CostConfig:
    """The price table (conf/cost/gcp.yaml), read by harness/cost.py (cost so far) and infra/pricing.py
    (`make cost-per-hour`): a node costs machine_hourly[machine type] + GPUs x gpu_hourly[gpu type]."""

    source: str = ""
    as_of: str = ""
    # <gpu or machine type>: {spot: USD/h, on_demand: USD/h}, each checked by price() at load
    gpu_hourly: dict[str, dict[str, float]] = field(default_factory=dict)
    machine_hourly: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """`python -m harness.sweep` (make sweep): how a Hydra multirun becomes jobs (harness/sweep/)."""

    name: str | None = None  # <root>/<name>/; None: `sweep-` + a hash of the command line's overrides
    root: str = "runs"  # where sweeps live locally: <root>/<name>/sweep.json and each job's run dir
    on: str = "local"  # local | chaos | gcp (gcp: `make deploy ARGS="--multirun ..."`, then --status)
    parallel: int = 1  # local and chaos: jobs run side by side on this machine
    max_concurrent: int | None = None  # jobs running at once, the rest queued (GCP: GPU quota); None: no limit
    # Set by the sweep on each job it starts (its place in the sweep; W&B gets them with the config).
    index: int | None = None
    job_overrides: list[str] = field(default_factory=list)


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 1337
    train: TrainConfig = field(default_factory=TrainConfig)
    # Typed per option (conf/model/gpt.yaml extends GPTConfig); a user's own model config is free-form.
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    # Groups owned by the infra layer: infra/settings.py types and validates them (infra is not on the VMs).
    infra: Any = None
    topology: Any = None


def register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    cs.store(group="model", name="gpt_schema", node=GPTConfig)
    hf = OmegaConf.structured(HFModelConfig)
    OmegaConf.set_struct(hf.config, False)  # `model.config.<any key of the model type>=...` needs no '+'
    cs.store(group="model", name="hf_schema", node=hf)


def one_of(key: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")


def structured(schema: type[T], node: Any, prefix: str) -> T:
    """`node` checked against the dataclass `schema` (unknown keys, wrong types) as a `schema`
    instance, for groups typed Any in JobConfig; ConfigError names `<prefix>.<key>`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = f"{prefix}.{err.full_key}" if getattr(err, "full_key", None) else prefix
        raise ConfigError(f"{key}: {str(err.msg).splitlines()[0]}") from None


PROVISIONING = ("spot", "on_demand")  # the price table's provisioning models


def price(key: str, value: object) -> float:
    """A price of the cost table: a number >= 0, USD per hour; ConfigError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a price >= 0 in USD per hour")
    return float(value)


def checkpoint_config(cfg: Any) -> CheckpointConfig:
    """The `checkpoint` group as the checkpoint engine receives it: a CheckpointConfig, interpolations
    resolved (load() has checked it)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg.checkpoint)  # type: ignore[return-value]


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if zero_ok else '> 0'}")


def telemetry_config(node: Any) -> TelemetryConfig:
    """The `telemetry` group as the telemetry layer receives it: typed and checked."""
    cfg = structured(TelemetryConfig, node, "telemetry")
    for key in ("ledger_flush_s", "job_metrics_s", "close_timeout_s", "retry_initial_s", "retry_max_s",
                "queue_size"):
        _positive(f"telemetry.{key}", getattr(cfg, key))
    m = cfg.monitoring
    if m.period_s < MIN_MONITORING_PERIOD_S:
        raise ConfigError(f"telemetry.monitoring.period_s={m.period_s} must be >= {MIN_MONITORING_PERIOD_S:g}:"
                          " Cloud Monitoring takes one point per series every few seconds at most")
    _positive("telemetry.monitoring.timeout_s", m.timeout_s)
    if m.enabled and not m.project:
        raise ConfigError("telemetry.monitoring.project is required when telemetry.monitoring.enabled=true")
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; raises ConfigError naming the key."""
    _positive("train.max_steps", cfg.train.max_steps)
    _positive("train.global_batch_size", cfg.train.global_batch_size)
    _positive("train.log_interval", cfg.train.log_interval)
    _positive("train.micro_batch_size", cfg.train.micro_batch_size, zero_ok=True)
    if cfg.train.grad_accum is not None:
        _positive("train.grad_accum", cfg.train.grad_accum)
    one_of("train.device", cfg.train.device, ("auto", "cpu", "cuda"))
    interval = cfg.checkpoint.interval_steps
    if interval != "auto" and not (isinstance(interval, int) and not isinstance(interval, bool) and interval > 0):
        raise ConfigError(f"checkpoint.interval_steps={interval!r} must be a positive integer or 'auto'")
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("checkpoint.assumed_bandwidth_mb_s", cfg.checkpoint.assumed_bandwidth_mb_s)
    _positive("checkpoint.list_retry_s", cfg.checkpoint.list_retry_s, zero_ok=True)
    if not re.fullmatch(r"\d+(:\d+)?", str(cfg.launch.nnodes)):
        raise ConfigError(f"launch.nnodes={cfg.launch.nnodes!r} must be 'N' or 'MIN:MAX'")
    multi_node = max_nodes(cfg.launch) > 1
    for i, tier in enumerate(cfg.checkpoint.slower_tiers):
        _positive(f"checkpoint.slower_tiers[{i}].assumed_bandwidth_mb_s", tier.assumed_bandwidth_mb_s, zero_ok=True)
        if multi_node and ("://" not in tier.url or tier.url.startswith("file://")):
            raise ConfigError(
                f"checkpoint.slower_tiers[{i}].url={tier.url!r} is a local path, but launch.nnodes="
                f"{cfg.launch.nnodes} allows several nodes: a node's local tier holds only its own share of "
                "a checkpoint and could not restore the job; use a gs:// tier, or a local one with launch.nnodes=1")
    one_of("train.parallelism", cfg.train.parallelism, ("ddp", "fsdp"))
    one_of("train.fsdp.param_dtype", cfg.train.fsdp.param_dtype, FSDP_DTYPES)
    one_of("train.fsdp.reduce_dtype", cfg.train.fsdp.reduce_dtype, FSDP_DTYPES)
    one_of("checkpoint.if_busy", cfg.checkpoint.if_busy, ("wait", "skip"))
    for table in ("gpu_hourly", "machine_hourly"):
        for item, prices in cfg.cost[table].items():
            for provisioning, value in prices.items():
                if provisioning not in PROVISIONING:
                    raise ConfigError(f"cost.{table}.{item}.{provisioning}: not a provisioning model; the table "
                                      f"has {', '.join(PROVISIONING)}")
                price(f"cost.{table}.{item}.{provisioning}", value)
    one_of("wandb.mode", cfg.wandb.mode, ("offline", "online", "disabled"))
    _positive("launch.nproc_per_node", cfg.launch.nproc_per_node)
    one_of("launch.workers", cfg.launch.workers, ("auto", "fork", "exec"))
    _positive("preemption.deadline_s", cfg.preemption.deadline_s)
    for key in ("stall_s", "rendezvous_s", "restore_s", "save_s"):
        _positive(f"health.{key}", cfg.health[key])
    one_of("preemption.in_flight_step", cfg.preemption.in_flight_step, ("finish", "abandon"))
    one_of("elastic.lr_scaling", cfg.elastic.lr_scaling, ("none", "linear", "sqrt"))
    one_of("elastic.on_preemption", cfg.elastic.on_preemption, ("wait", "shrink"))
    _positive("elastic.shrink_last_call_s", cfg.elastic.shrink_last_call_s)
    try:
        check_every_world_size(cfg.train, cfg.elastic, cfg.launch)
    except BatchSplitError as err:
        raise ConfigError(str(err)) from None
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0")
    if not str(cfg.model.get("_target_", "")):
        raise ConfigError("model._target_ is required: the import path of an nn.Module class")
    telemetry_config(cfg.telemetry)


def load(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose `conf/` with Hydra overrides, resolve and validate; ConfigError on any bad input.

    The compose API rather than @hydra.main: every rank under torchrun composes the same config
    without a Hydra output directory of its own.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(first_line(err)) from None
    validate(cfg)
    return cfg


def first_line(err: BaseException) -> str:
    """Hydra's message plus its cause's first line ("Value 'abc' ... Integer"), without OmegaConf's
    object_type noise: enough to name the key and what it accepts."""
    parts = []
    while err is not None and len(parts) < 3:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        parts += [line for line in lines if not line.startswith(("reference_type", "object_type", "To append"))]
        err = err.__cause__
    return " | ".join(dict.fromkeys(parts))
