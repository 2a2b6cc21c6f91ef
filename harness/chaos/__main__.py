"""`python -m harness.chaos [overrides]` (`make chaos`): run a training job on the local Spot cloud.

Overrides starting with `chaos.` configure the cloud (harness/chaos/conf/chaos.yaml); every other override is
the job's and the deployment's, exactly as `make deploy` takes them (`topology=all_spot`, training
keys), appended to `chaos.job`; infra/vm.py turns them into each VM's metadata. Prints where the
report and the timeline are; exits 0 when the job finished, 1 when it did not, 2 on a bad config.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig

from harness import config
from harness.chaos import report, schedule
from harness.chaos.cloud import Cloud
from harness.chaos.reference import Reference
from infra import settings as infra_settings
from infra.settings import Settings
from infra.vm import groups

CONF = Path(__file__).resolve().parent / "conf"


@dataclass
class BaselineConfig:
    interval_steps: int = MISSING
    gcs_every: int = MISSING
    keep: int = MISSING


@dataclass
class ChaosConfig:
    """The types of harness/chaos/conf/chaos.yaml (the values and what each means live there)."""

    name: str = MISSING
    out_dir: str = MISSING
    trainer: str = MISSING
    mtbi_s: float = MISSING
    seed: int = MISSING
    preemptions: list[Any] | None = MISSING  # entries checked by schedule.explicit
    notice_s: float = MISSING
    recreate_s: float = MISSING
    health_interval_s: float = MISSING
    health_initial_delay_s: float = MISSING
    boot_after_end: bool = MISSING
    max_duration_s: float = MISSING
    boot_timeout_s: float = MISSING
    boot_stagger_s: float = MISSING
    poll_s: float = MISSING
    reference: bool = MISSING
    job: list[str] = MISSING
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


def is_chaos_key(override: str) -> bool:
    return override.lstrip("+~").startswith("chaos.")


def load_chaos(overrides: list[str]) -> DictConfig:
    """The cloud's own settings: harness/chaos/conf/chaos.yaml with the command line's `chaos.*`
    overrides (Hydra's grammar), typed by ChaosConfig (a wrong type or an unknown key fails here). The
    job's config tree carries no `chaos` group; only the guides' baseline trainer reads
    `chaos.baseline.*`, which the job gets as added keys."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    own = [re.sub(r"^([+~]*)chaos\.", r"\1", o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = OmegaConf.merge(OmegaConf.structured(ChaosConfig), compose(config_name="chaos", overrides=own))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise config.ConfigError(f"chaos.*: {config.first_line(err)}") from None
    return cfg


def compose(overrides: list[str]) -> tuple[list[str], DictConfig, Settings]:
    """The job's overrides as `make deploy` would take them (chaos.job, the job's name and trainer, then
    the command line's), the config every VM composes from them with the cloud's settings as `chaos`,
    and their deployment."""
    from omegaconf import OmegaConf

    chaos = load_chaos([o for o in overrides if is_chaos_key(o)])
    job = [*chaos.job, f"run.name={chaos.name}", f"launch.module={chaos.trainer}",
           *(f"++chaos.baseline.{key}={value}" for key, value in chaos.baseline.items()),
           *(o for o in overrides if not is_chaos_key(o))]
    cfg = config.load(job)  # the job as every VM will compose it: fail here, not on the VMs
    OmegaConf.set_struct(cfg, False)
    cfg.chaos = chaos
    return job, cfg, infra_settings.load(job)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """Unwind through the cloud's cleanup (no simulated VM is left running); a second signal, as from a
    process-group kill, must not interrupt that cleanup."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    overrides = sys.argv[1:] if argv is None else argv
    try:
        job, cfg, settings = compose(overrides)
        plan = schedule.build(cfg.chaos, sum(group.size for group in groups(settings) if group.spot))
        cloud = Cloud(cfg, settings, Path(cfg.chaos.out_dir), plan)
    except (config.ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    chaos, out = cfg.chaos, cloud.out
    for stale in ("vms", "logs", "gcs", "chaos_report.json", "chaos_timeline.png", "ledger.jsonl"):
        path = out / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    ref = Reference(list(job), cloud.world_size, out.parent / "references", chaos.max_duration_s)
    if chaos.reference:
        ref.start()
    vms = ", ".join(f"{s.spec.name} ({s.spec.role})" for s in cloud.slots)
    print(f"chaos: topology {settings.topology.name}: {vms}; world size {cloud.world_size}, trainer "
          f"{chaos.trainer}, {len(cloud.schedule)} preemptions planned (mtbi_s={chaos.mtbi_s} per Spot VM, "
          f"seed {chaos.seed}, notice {chaos.notice_s}s, recreate {chaos.recreate_s}s)", flush=True)
    try:
        outcome = cloud.run()
        reference_sha = ref.model_sha256() if chaos.reference else None
    finally:
        ref.stop()
    result = report.build(outcome, chaos, settings, cloud.found, reference_sha)
    json_path, png_path = report.write(result, outcome, out)
    ledger = result["ledger"]["goodput"] if result["ledger"] else None
    print(f"chaos: finished={result['finished']} goodput: ledger {'-' if ledger is None else f'{ledger:.3f}'}, "
          f"observer {result['observer']['goodput']:.3f}; preemptions={result['preemptions']} "
          f"recreates={result['recreates']} "
          f"lost_steps={result['lost_steps']} exact={result['exact']}\n"
          f"  report:   {json_path}\n  timeline: {png_path}\n  VM logs:  {outcome.logs}", flush=True)
    return 0 if outcome.finished else 1


if __name__ == "__main__":
    sys.exit(main())
