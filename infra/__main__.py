"""`python -m infra synth|plan|deploy|destroy|cost|logs [Hydra overrides...]` (the Makefile's infra targets).

    synth    write the Terraform JSON under infra.outdir (no cloud access, no terraform binary)
    plan     synth, then terraform init + plan
    deploy   check the prerequisites (terraform, credentials, gcloud, project, APIs, GPU quota) and
             refuse a run that has finished (its `finished` record is in the bucket) unless
             --resume-finished; build the harness wheel and the wheelhouse, synth, terraform init, then:
               1. plan -out + apply of the foundation (APIs, bucket, identities and their grants)
               2. publish the release to gs://<bucket>/releases/<version>/ (manifest.json last)
               3. plan -out + apply of everything (instance groups, network, monitoring), then the
                  master's group back to 1 (the job's end resized it to 0; Terraform leaves its size alone)
    destroy  synth, then terraform init + destroy (asks for confirmation unless --yes)
    cost     the hourly cost of each topology at the configured prices (or of the one given)
    --multirun (-m) with synth|plan|deploy|destroy: the overrides are a sweep (Hydra's grammar), deployed
             as one deployment with a Spot MIG per job and a queue within sweep.max_concurrent (infra/sweep.py)
    logs     print a run's log (run.name=... required) from Cloud Logging, across its VMs and their
             incarnations, oldest first: `gcloud logging read` on the labels the VMs ship
             (infra/logs.py); --freshness (default 1d), --limit (default 1000, the newest),
             --role, --vm narrow it. Needs gcloud, logged in with roles/logging.viewer on infra.project.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness import job_end
from harness.checkpoint.store import Store, StoreError
from harness.config import ConfigError
from infra import logs, pricing, release, settings, terraform, vm

TOPOLOGIES = tuple(sorted(p.stem for p in (settings.REPO / "conf" / "topology").glob("*.yaml")))
PLAN_FILE = "tfplan"
FOUNDATION_PLAN_FILE = "tfplan-foundation"


def _cost_line(s: settings.Settings) -> str:
    c = pricing.hourly_cost(s)
    return (f"{c.topology}: ${c.at_max:.2f}/h with {c.workers_max} workers, ${c.at_min:.2f}/h with "
            f"{c.workers_min}; the same training nodes on-demand ${c.on_demand_equivalent:.2f}/h "
            f"(prices as of {c.as_of})")


def _cost_table(overrides: Sequence[str]) -> str:
    chosen = any(o.startswith("topology=") for o in overrides)
    rows = []
    for topology in [None] if chosen else TOPOLOGIES:
        s = settings.load([*overrides, f"topology={topology}"] if topology else overrides)
        rows.append((s, pricing.hourly_cost(s)))
    return pricing.table(rows)


def _synth(s: settings.Settings, version: str) -> Path:
    from infra import stacks  # the provider bindings: seconds to import, only when synthesizing

    stack_dir = stacks.synth(s, version)
    print(f"synthesized {stack_dir / 'cdk.tf.json'}\n{_cost_line(s)}", flush=True)
    for warning in settings.warnings(s):
        print(f"warning: {warning}", flush=True)
    return stack_dir


def _finished_run(s: settings.Settings, resume: bool) -> Store | None:
    """Refuse to deploy a run whose `finished` record is in the bucket (its VMs would boot only to stop
    again), unless `resume`: then the store whose record _deploy removes before the groups come up."""
    from harness.checkpoint.gcs_store import GCSStore
    from infra.constructs.storage import checkpoint_prefix  # the provider bindings: deploy pays them anyway

    store = GCSStore(f"gs://{s.infra.bucket.name}/{checkpoint_prefix(s.run_id)}", retry_deadline_s=30.0,
                     project=s.infra.project)
    done = job_end.read(store)  # a bucket that does not exist yet holds no record
    if done is None:
        return None
    if not resume:
        raise ConfigError(f"run.name={s.run_id!r} finished at step {done.step} on {done.time} "
                          f"({job_end.location(store)}): a deploy would boot VMs that stop at once; give a new "
                          "run.name, or pass --resume-finished to run it again from its newest checkpoint "
                          "(with a higher train.max_steps to train further)")
    return store


def _deploy(binary: str, gcloud: str, s: settings.Settings, quota_checked: bool, resume: Store | None) -> None:
    """Build, synthesize and apply in the order a fresh project needs (see the module docstring)."""
    from infra import prerequisites, stacks

    with tempfile.TemporaryDirectory(prefix="spot-harness-wheel-") as wheel_dir:
        # Build first: a harness that does not build must not leave half a deployment behind.
        wheel = release.build_wheel(Path(wheel_dir))
        wheelhouse = release.build_wheelhouse(s)
        version = release.version(s)
        stack_dir = _synth(s, version)
        terraform.run(binary, stack_dir, "init", "-input=false")
        foundation = terraform.targets(stack_dir, stacks.FOUNDATION)
        terraform.run(binary, stack_dir, "plan", "-input=false", *foundation, f"-out={FOUNDATION_PLAN_FILE}")
        terraform.run(binary, stack_dir, "apply", "-input=false", FOUNDATION_PLAN_FILE)
        print(f"published {release.publish(s, version, wheel, wheelhouse)}", flush=True)
    if not quota_checked:
        prerequisites.check_quota(s, gcloud)
    if resume is not None and resume.delete_record(job_end.RECORD):  # before any VM of the run can boot
        print(f"--resume-finished: removed {job_end.location(resume)}", flush=True)
    terraform.run(binary, stack_dir, "plan", "-input=false", f"-out={PLAN_FILE}")
    terraform.run(binary, stack_dir, "apply", "-input=false", PLAN_FILE)
    # The workers' size is Terraform's; the master's group has its size ignored (its one instance comes
    # from a per-instance config), so after a finished run resized it to 0 it is brought back here.
    master = vm.group_paths(s)[vm.groups(s)[0].role]
    job_end.resize(master, 1)
    print(f"{master}: target size 1", flush=True)
    for warning in settings.warnings(s):
        print(f"warning: {warning}", flush=True)


def _logs(overrides: Sequence[str], freshness: str, limit: int, role: str | None, vm_name: str | None) -> None:
    from infra import prerequisites

    s = settings.load(overrides)
    logs.check(s, overrides, freshness, limit)
    logs.show(prerequisites.gcloud(), s, freshness, limit, role, vm_name)


def run(command: str, overrides: Sequence[str], yes: bool = False, resume_finished: bool = False) -> None:
    if command == "cost":
        print(_cost_table(overrides))
        return
    binary = None if command == "synth" else terraform.preflight()
    s = settings.load(overrides)
    if binary and s.infra.project == settings.PLACEHOLDER_PROJECT:
        raise ConfigError(f"infra.project={s.infra.project!r} is the placeholder; set infra.project=<your project id>")
    if binary and command == "deploy":
        from infra import prerequisites

        gcloud = prerequisites.gcloud()
        quota_checked = prerequisites.check_project(s, gcloud)
        _deploy(binary, gcloud, s, quota_checked, _finished_run(s, resume_finished))
        return
    stack_dir = _synth(s, release.version(s))
    if binary is None:
        return
    terraform.plan_or_destroy(binary, stack_dir, command, yes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("synth", "plan", "deploy", "destroy", "cost", "logs"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, exactly as for training")
    parser.add_argument("--yes", action="store_true", help="destroy without asking for confirmation")
    parser.add_argument("--multirun", "-m", action="store_true",
                        help="the overrides are a sweep: one deployment, a Spot MIG per job (infra/sweep.py)")
    parser.add_argument("--resume-finished", action="store_true",
                        help="deploy a run that has finished again (its `finished` record is removed)")
    parser.add_argument("--freshness", default="1d", help="logs: entries from this far back (30m, 6h, 1d, 2w)")
    parser.add_argument("--limit", type=int, default=1000, help="logs: at most this many entries, the newest")
    parser.add_argument("--role", choices=logs.ROLES, help="logs: only this role's VMs")
    parser.add_argument("--vm", help="logs: only this VM (its instance name)")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.multirun:
            from infra import sweep

            sweep.run(args.command, args.overrides, args.yes)
        elif args.command == "logs":
            _logs(args.overrides, args.freshness, args.limit, args.role, args.vm)
        else:
            run(args.command, args.overrides, args.yes, args.resume_finished)
    except (ConfigError, terraform.PreflightError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except job_end.ResizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        print(f"error: {Path(str(err.cmd[0])).name} {' '.join(map(str, err.cmd[1:]))} failed (exit {err.returncode})",
              file=sys.stderr)
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
