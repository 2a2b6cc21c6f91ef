"""From a command line of Hydra overrides to the sweep's jobs.

Contract:
- Overrides starting with `sweep.` configure the sweep (SweepConfig in harness/config.py) and are never
  swept. Every other override is parsed by Hydra's own override parser (`OverridesParser`, with the
  config loader of `conf/`, so `glob(...)` sees the config groups' options) and expanded by Hydra's
  basic sweeper (`BasicSweeper.split_arguments`): comma lists, `range(...)`, `choice(...)`, `glob(...)`
  give the cartesian product, first dimension outermost, in the order given. `interval(...)` (a
  continuous range: no finite list of jobs) and `shuffle(...)` (a different order, hence different job
  names, at every re-run) are refused.
- Job `i` is an ordinary run: `run.name=<sweep>/<i>-<short overrides>` (the swept keys' last names and
  values, e.g. `abl/1-lr0.0003-n_layer4`), its own run dir `<sweep.root>/<sweep>/<i>-...` (local and
  on the local Spot cloud), its own checkpoints and ledger. Each job also gets `wandb.group=<sweep>`,
  `sweep.name`, `sweep.index` and `sweep.job_overrides` (its swept overrides), which W&B records with
  the config. `run.name` and `run.dir` cannot be given: the sweep sets them.
- The sweep's name is `sweep.name`, else `sweep-` + 6 hex digits of a hash of the command line's
  overrides (`sweep.*` left out), so running the same command again is the same sweep.
- Every job's config is composed and validated (`harness.config.load`, and the deployment's checks for
  the local Spot cloud and GCP) before any job starts; the first bad one raises ConfigError naming the
  job and the key. So do two jobs that would share a checkpoint store or run dir.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import config
from harness.config import ConfigError, SweepConfig, one_of

PLACES = ("local", "chaos", "gcp")
RESERVED = ("run.name", "run.dir", "chaos.name", "chaos.out_dir")  # the sweep sets them per job
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
SHORT_MAX = 48  # characters of the swept values in a job's name


def key_of(override: str) -> str:
    """The key an override string sets, without Hydra's `+`/`++`/`~` prefixes."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def is_sweep_key(override: str) -> bool:
    return key_of(override).startswith("sweep.")


def quote(value: str) -> str:
    """`value` as a single-quoted Hydra string (one list element, whatever it holds). In Hydra's quoted
    strings a backslash escapes only a quote or the backslashes before one (and at the end)."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


@dataclass(frozen=True)
class Job:
    """One job of the sweep: `overrides` are the command line's (fixed and swept) for this job."""

    index: int
    run_name: str
    overrides: tuple[str, ...]
    swept: dict[str, str] = field(default_factory=dict)  # sweep dimension key -> this job's value

    @property
    def swept_overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.swept.items()]

    def job_overrides(self, sweep: str) -> list[str]:
        """What the job runs with, on any machine: its overrides, then its place in the sweep."""
        own = ",".join(quote(o) for o in self.swept_overrides)
        return [*self.overrides, f"wandb.group={sweep}", f"sweep.name={sweep}", f"sweep.index={self.index}",
                f"sweep.job_overrides=[{own}]"]


@dataclass(frozen=True)
class Sweep:
    name: str
    cfg: SweepConfig
    own: tuple[str, ...]  # the `sweep.*` overrides
    common: tuple[str, ...]  # the overrides that are the same in every job
    dimensions: dict[str, list[str]]
    jobs: tuple[Job, ...]
    root: Path = Path("runs")

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def job_dir(self, job: Job) -> Path:
        return self.root / job.run_name

    def describe(self) -> str:
        dims = " x ".join(f"{k} ({len(v)})" for k, v in self.dimensions.items()) or "no sweep dimension"
        return f"sweep {self.name!r}: {len(self.jobs)} jobs, {dims}"


def split(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the sweep's own `sweep.*` overrides, every other one)."""
    own = [o for o in overrides if is_sweep_key(o)]
    return own, [o for o in overrides if not is_sweep_key(o)]


def expand(overrides: Sequence[str]) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Hydra's expansion of `overrides` (no `sweep.*` among them): the jobs' override lists, and each
    sweep dimension's values. ConfigError naming the key for an override Hydra cannot parse or sweep."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    config.register()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        parsed = []
        for text in overrides:
            try:
                parsed += parser.parse_overrides([text])
            except HydraException as err:
                raise ConfigError(f"{key_of(text) or repr(text)}: cannot parse {text!r}: {_hydra_message(err)}; "
                                  "allowed: key=value, or a sweep: a,b,c | range(start,stop[,step]) | "
                                  "choice(a,b) | glob(pattern)") from None
        dimensions: dict[str, list[str]] = {}
        for o in parsed:
            key = o.get_key_element()
            if not o.is_sweep_override():
                continue
            if not o.is_discrete_sweep():
                raise ConfigError(f"{key}: {o.input_line!r} is a continuous sweep (interval): it has no finite "
                                  "list of jobs; allowed: a,b,c | range(...) | choice(...) | glob(...)")
            if getattr(o.value(), "shuffle", False):
                raise ConfigError(f"{key}: {o.input_line!r} shuffles its values: the jobs' order, and so their "
                                  "names, would change at every re-run; list the values in the order to run them")
            try:
                dimensions[key] = list(o.sweep_string_iterator())
            except HydraException as err:
                raise ConfigError(f"{key}: {_hydra_message(err)}") from None
            if not dimensions[key]:
                raise ConfigError(f"{key}: {o.input_line!r} gives no value (an empty range or glob)")
        try:
            [batch] = BasicSweeper.split_arguments(parsed, None)
        except HydraException as err:
            raise ConfigError(_hydra_message(err)) from None
    return batch, dimensions


def _hydra_message(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See https")]
    return " ".join(lines)


def default_name(rest: Sequence[str]) -> str:
    return "sweep-" + hashlib.sha256(json.dumps(list(rest)).encode()).hexdigest()[:6]


def _leaf(key: str) -> str:
    return key.lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def short_name(swept: dict[str, str]) -> str:
    """The swept keys' last names and values as one path segment: `lr0.0003-n_layer4`, `model_gpt`."""
    parts = []
    for key, value in swept.items():
        leaf, value = _leaf(key), value.strip("'\"")
        glue = "_" if leaf[-1:].isalpha() and value[:1].isalpha() else ""
        parts.append(f"{leaf}{glue}{value}")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._-")
    return text[:SHORT_MAX].rstrip("._-")


def build(overrides: Sequence[str], root: str | Path | None = None) -> Sweep:
    """The sweep of a command line, its jobs named and numbered; nothing is composed yet (see `check`)."""
    own, rest = split(overrides)
    for o in rest:
        if key_of(o) in RESERVED:
            raise ConfigError(f"{key_of(o)}: the sweep names and places each job ({key_of(o)} of job i is "
                              "<sweep.root>/<sweep.name>/<i>-<short overrides>); set sweep.name or sweep.root instead")
    cfg = sweep_config(own)
    name = cfg.name or default_name(rest)
    if not NAME.fullmatch(name):
        raise ConfigError(f"sweep.name={name!r} is not allowed: 1-40 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit (it names runs/<sweep.name>/ and every job's run.name)")
    batch, dimensions = expand(rest)
    jobs = []
    for i, job in enumerate(batch):
        swept = {}
        for text in job:
            key, _, value = text.partition("=")
            if key in dimensions:
                swept[key] = value
        short = short_name(swept)
        jobs.append(Job(i, f"{name}/{i}-{short}" if short else f"{name}/{i}", tuple(job), swept))
    common = tuple(o for o in batch[0] if o.partition("=")[0] not in dimensions) if batch else ()
    return Sweep(name, cfg, tuple(own), common, dimensions, tuple(jobs), Path(root or cfg.root))


def sweep_config(own: Sequence[str]) -> SweepConfig:
    """The `sweep` group with the command line's `sweep.*` overrides, typed and checked."""
    from omegaconf import OmegaConf

    cfg: SweepConfig = OmegaConf.to_object(config.load(list(own)).sweep)  # type: ignore[assignment]
    one_of("sweep.on", cfg.on, PLACES)
    if cfg.parallel < 1:
        raise ConfigError(f"sweep.parallel={cfg.parallel} must be >= 1")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise ConfigError(f"sweep.max_concurrent={cfg.max_concurrent} must be >= 1, or null for no limit")
    if cfg.index is not None or cfg.job_overrides:
        raise ConfigError("sweep.index and sweep.job_overrides are set by the sweep on each job, not on its "
                          "command line")
    return cfg


def limit(cfg: SweepConfig) -> int:
    """How many jobs run at once on this machine: sweep.parallel, within sweep.max_concurrent."""
    return min(cfg.parallel, cfg.max_concurrent or cfg.parallel)


# --- checks before anything starts ------------------------------------------------------------------

def local_overrides(sweep: Sweep, job: Job) -> list[str]:
    """`python -m harness.launch` of `job` on this machine (sweep.on=local)."""
    return [*job.job_overrides(sweep.name), f"run.name={job.run_name}", f"run.dir={sweep.job_dir(job)}"]


def chaos_overrides(sweep: Sweep, job: Job) -> list[str]:
    """`python -m harness.chaos` of `job` (sweep.on=chaos): the cloud names the run after chaos.name and
    writes its report in the job's folder; references are cached beside, in <sweep>/references/."""
    return [*job.job_overrides(sweep.name), f"chaos.name={job.run_name}", f"chaos.out_dir={sweep.job_dir(job)}"]


def gcp_overrides(sweep: Sweep, job: Job) -> list[str]:
    """`job` on Google Cloud: startup.sh sets run.dir (the VM's local SSD) and the checkpoint tiers."""
    return [*job.job_overrides(sweep.name), f"run.name={job.run_name}"]


def overrides_for(sweep: Sweep, job: Job) -> list[str]:
    on = sweep.cfg.on
    return local_overrides(sweep, job) if on == "local" else chaos_overrides(sweep, job) if on == "chaos" \
        else gcp_overrides(sweep, job)


def check(sweep: Sweep, compose: Callable[[list[str]], Any] | None = None) -> list[Any]:
    """Compose and validate every job before any starts; returns each job's composed config.
    ConfigError naming the job and the key at the first that fails, or when two jobs would share a
    run dir or a checkpoint tier."""
    compose = compose or _composer(sweep.cfg.on)
    composed, seen = [], {}
    for job in sweep.jobs:
        what = f"job {job.index} ({' '.join(job.swept_overrides) or 'no swept key'})"
        try:
            cfg = compose(overrides_for(sweep, job))
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"{what}: {err}") from None
        job_cfg = cfg[1] if isinstance(cfg, tuple) else cfg  # harness.chaos's compose: (job, cfg, settings)
        places = {"run.dir": job_cfg.run.dir, "checkpoint.store": job_cfg.checkpoint.store}
        for n, tier in enumerate(job_cfg.checkpoint.slower_tiers):
            places[f"checkpoint.slower_tiers[{n}].url"] = tier.url
        for key, value in places.items():
            other = seen.setdefault((key, str(value)), job.index)
            if other != job.index:
                raise ConfigError(f"{key}={value!r} is the same for job {other} and job {job.index}: each job needs "
                                  f"its own; leave {key} at its default or put ${{run.name}} in it")
        composed.append(cfg)
    return composed


def _composer(on: str) -> Callable[[list[str]], Any]:
    if on == "chaos":
        from harness.chaos.__main__ import compose

        return compose
    return config.load
