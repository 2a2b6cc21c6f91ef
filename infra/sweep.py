"""A sweep on Google Cloud: `python -m infra synth|plan|deploy|destroy --multirun [overrides]`
(`make deploy ARGS="--multirun infra.project=P optim.lr=1e-3,3e-4"`): one deployment for every job of
a Hydra multirun.

Contract:
- The overrides expand into jobs exactly as `make sweep` expands them (harness/sweep/jobs.py: Hydra's
  parser and basic sweeper, the same names `<sweep>/<index>-<short overrides>`); every job's deployment
  settings are loaded and checked (infra/settings.py) before anything is built.
- Once for the sweep: the APIs, the network, the bucket, the service accounts and their grants, the
  alerts and the dashboard (the `infra.*` settings, which therefore cannot differ between jobs).
- Per job `i`: the topology's groups named `<infra.name>-<i>-...`: its Spot worker MIG of the job's
  node count (`topology.workers.max`), and in all_spot its small on-demand coordinator (the job's
  rendezvous store), the job's overrides in its templates' `spot-hydra-overrides` (escaped like every
  literal) and `spot-run-id` its run name. Its `spot-instance-groups` are its own groups: its end
  resizes them to 0 (harness/job_end.py).
- The queue (harness/sweep/queue.py): every trainer template carries `spot-sweep-queue`; at creation the
  first `sweep.max_concurrent` unfinished jobs get their worker group's size, the others 0, and from then
  on the queue owns the sizes (Terraform ignores them). A finishing job's rank 0 starts the next ones.
  `make deploy` applies the same rule once more after the apply, so a redeploy restarts a stalled queue,
  and brings back the master or coordinator group (size 1) of every job not finished.
- With queued jobs the topology must be all_spot: a hybrid job's on-demand GPU master would run (and
  bill) while its job waits in the queue.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import job_end
from harness.config import ConfigError
from harness.sweep import jobs as sweep_jobs
from harness.sweep.jobs import Sweep
from harness.sweep.queue import QUEUE_KEY, Entry, Queue, durable_url
from infra import settings as infra_settings
from infra import terraform, vm
from infra.settings import Settings


@dataclass(frozen=True)
class Deployment:
    sweep: Sweep
    base: Settings  # the shared part: job 0's settings, infra.* the same for every job
    jobs: tuple[Settings, ...]  # per job: its settings, infra.name = <infra.name>-<index>
    queue: Queue

    @property
    def name(self) -> str:
        return self.base.infra.name

    def groups(self) -> list[str]:
        """Every instance group of the deployment, each job's workers first: what the trainers may resize."""
        return [path for s in self.jobs for path in vm.group_paths(s).values()]

    def queue_metadata(self) -> dict[str, str]:
        return {QUEUE_KEY: self.queue.to_metadata()}


def _first_difference(a: dict, b: dict, prefix: str = "infra") -> str:
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            if found := _first_difference(a[key], b[key], f"{prefix}.{key}"):
                return found
        elif a[key] != b.get(key):
            return f"{prefix}.{key}"
    return ""


def load(overrides: Sequence[str]) -> Deployment:
    """The sweep's jobs and each one's deployment settings, checked; ConfigError naming the job and key."""
    sweep = sweep_jobs.build([*overrides, "sweep.on=gcp"])
    swept_infra = [k for k in sweep.dimensions if sweep_jobs.key_of(k).startswith("infra.")]
    if swept_infra:
        raise ConfigError(f"{swept_infra[0]}: a sweep is one deployment, its infra.* the same for every job; "
                          "sweep training and topology keys, or deploy another sweep with its own infra.name")
    loaded = []
    for job in sweep.jobs:
        try:
            loaded.append(infra_settings.load(sweep_jobs.gcp_overrides(sweep, job)))
        except ConfigError as err:
            raise ConfigError(f"job {job.index} ({' '.join(job.swept_overrides) or 'no swept key'}): {err}") from None
    base = loaded[0]
    for job, s in zip(sweep.jobs, loaded, strict=True):
        if key := _first_difference(asdict(base.infra), asdict(s.infra)):
            raise ConfigError(f"{key} differs between job 0 and job {job.index}: a sweep is one deployment; "
                              "give infra.* once, for every job")
    per_job = tuple(replace(s, infra=replace(s.infra, name=f"{s.infra.name}-{job.index}"))
                    for job, s in zip(sweep.jobs, loaded, strict=True))
    entries = tuple(Entry(job.run_name, vm.group_paths(s)["worker"], s.topology.workers.max,
                          _max_steps(sweep, job)) for job, s in zip(sweep.jobs, per_job, strict=True))
    queue = Queue(sweep.name, base.infra.bucket.name, sweep.cfg.max_concurrent, entries)
    if queue.width < len(entries):
        trains = [job.index for job, s in zip(sweep.jobs, per_job, strict=True) if s.master_trains]
        if trains:
            raise ConfigError(f"sweep.max_concurrent={sweep.cfg.max_concurrent} queues jobs, but job {trains[0]} has "
                              f"topology={per_job[trains[0]].topology.name}: its on-demand master would run and bill "
                              "while the job waits; use topology=all_spot (a small CPU coordinator per job), or "
                              "sweep.max_concurrent=null")
    return Deployment(sweep, base, per_job, queue)


def _max_steps(sweep: Sweep, job: sweep_jobs.Job) -> int:
    from harness import config

    return int(config.load(sweep_jobs.gcp_overrides(sweep, job)).train.max_steps)


def finished(dep: Deployment) -> set[str]:
    """The jobs finished now, from their records in the bucket (none when the bucket does not exist yet)."""
    from harness.sweep.queue import finished_runs

    return finished_runs(dep.queue)


def synth(dep: Deployment, release: str, done: set[str] | None = None) -> Path:
    from infra import sweep_stack  # the provider bindings: seconds to import, only when synthesizing

    stack_dir = sweep_stack.synth(dep, release, done or set())
    print(f"synthesized {stack_dir / 'cdk.tf.json'}: {dep.sweep.describe()}, at most "
          f"{dep.queue.width} at once", flush=True)
    for warning in infra_settings.warnings(dep.base):
        print(f"warning: {warning}", flush=True)
    return stack_dir


def gpus_needed(dep: Deployment) -> Counter[str]:
    """Quota metric -> GPUs of the `max_concurrent` largest jobs at once."""
    from infra import prerequisites

    needs = sorted((prerequisites.gpus_needed(s) for s in dep.jobs), key=lambda c: -sum(c.values()))
    total: Counter[str] = Counter()
    for need in needs[: dep.queue.width]:
        total.update(need)
    return total


def deploy(binary: str, gcloud: str, dep: Deployment, quota_checked: bool) -> None:
    """`make deploy --multirun`: the single deployment's order (infra/__main__.py), for the sweep's stack."""
    from infra import prerequisites, release, stacks

    s = dep.base
    done = finished(dep)
    with tempfile.TemporaryDirectory(prefix="spot-harness-wheel-") as wheel_dir:
        wheel = release.build_wheel(Path(wheel_dir))
        wheelhouse = release.build_wheelhouse(s)
        version = release.version(s)
        stack_dir = synth(dep, version, done)
        terraform.run(binary, stack_dir, "init", "-input=false")
        foundation = terraform.targets(stack_dir, stacks.FOUNDATION)
        terraform.run(binary, stack_dir, "plan", "-input=false", *foundation, "-out=tfplan-foundation")
        terraform.run(binary, stack_dir, "apply", "-input=false", "tfplan-foundation")
        print(f"published {release.publish(s, version, wheel, wheelhouse)}", flush=True)
    if not quota_checked:
        prerequisites.check_quota(s, gcloud, need=gpus_needed(dep))
    terraform.run(binary, stack_dir, "plan", "-input=false", "-out=tfplan")
    terraform.run(binary, stack_dir, "apply", "-input=false", "tfplan")
    for job, js in zip(dep.sweep.jobs, dep.jobs, strict=True):
        if job.run_name in done:
            continue
        master = vm.group_paths(js)[vm.groups(js)[0].role]
        job_end.resize(master, 1)
    for e in dep.queue.to_start(done):  # the queue's rule, as a finishing job applies it
        job_end.resize(e.group, e.size)
        print(f"{e.run}: {e.group} at size {e.size}", flush=True)
    waiting = [e.run for e in dep.queue.jobs if e.run not in done and e not in dep.queue.to_start(done)]
    print(f"sweep {dep.sweep.name}: {len(done)} finished, {len(dep.queue.to_start(done))} running, "
          f"{len(waiting)} queued; `make sweep-status ARGS=\"...the same overrides...\"` for the table", flush=True)


def run(command: str, overrides: Sequence[str], yes: bool = False) -> None:
    """`python -m infra <command> --multirun ...`."""
    from infra import release

    if command not in ("synth", "plan", "deploy", "destroy"):
        raise ConfigError(f"--multirun works with synth, plan, deploy and destroy, not {command!r}; for the cost "
                          "of a sweep: `make cost-plan ARGS=\"...\"`")
    binary = None if command == "synth" else terraform.preflight()
    dep = load(overrides)
    if binary and dep.base.infra.project == infra_settings.PLACEHOLDER_PROJECT:
        raise ConfigError(f"infra.project={dep.base.infra.project!r} is the placeholder; set "
                          "infra.project=<your project id>")
    if binary and command == "deploy":
        from infra import prerequisites

        gcloud = prerequisites.gcloud()
        quota_checked = prerequisites.check_project(dep.base, gcloud)
        if quota_checked:
            prerequisites.check_quota(dep.base, gcloud, need=gpus_needed(dep))
        deploy(binary, gcloud, dep, quota_checked)
        _local_record(dep)
        return
    stack_dir = synth(dep, release.version(dep.base))
    _local_record(dep)
    if binary is None:
        return
    terraform.plan_or_destroy(binary, stack_dir, command, yes)


def _local_record(dep: Deployment) -> None:
    """runs/<sweep>/sweep.json with `on: gcp`, so `make sweep-status` with the same overrides reads the bucket."""
    from harness.sweep import results

    path = dep.sweep.dir / results.FILE
    if results.read(path) is None:
        rows = [results.JobResult.of(job, e.max_steps, durable_url(dep.queue.bucket, e.run),
                                     None) for job, e in zip(dep.sweep.jobs, dep.queue.jobs, strict=True)]
        results.write(path, results.document(dep.sweep, rows, on="gcp"))
    print(f"sweep {dep.sweep.name}: {path}; queue {json.dumps([e.run for e in dep.queue.jobs])}", flush=True)
