"""What `make deploy` checks with `gcloud` before it creates anything, so that a fresh project fails
with one message listing what is missing instead of a half-applied stack: the project exists and is
visible, the APIs Terraform itself needs are enabled (the stack enables the others), and the region's
GPU quota covers the topology at its maximum size (Spot GPUs and on-demand GPUs have separate quotas).

Quota is read from Compute Engine, so it can be checked only once compute.googleapis.com is enabled;
on a project where it is not yet, `make deploy` checks it after the first phase has enabled it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

from infra import machines
from infra.constructs.apis import BOOTSTRAP
from infra.settings import Settings
from infra.terraform import PreflightError

COMPUTE_API = "compute.googleapis.com"
INSTALL_GCLOUD = "`gcloud` is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"


def gcloud() -> str:
    path = shutil.which("gcloud")
    if path is None:
        raise PreflightError(INSTALL_GCLOUD)
    return path


def _gcloud(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True)


def gpus_needed(s: Settings) -> Counter[str]:
    """Quota metric -> GPUs the topology uses at its maximum size."""
    need: Counter[str] = Counter()
    m, w = s.topology.master, s.topology.workers
    if m.gpu_type and m.gpu_count:
        need[machines.GPU_QUOTA[m.gpu_type]] += m.gpu_count
    if w.gpu_type and w.gpu_count:
        prefix = machines.SPOT_QUOTA_PREFIX if w.provisioning == "SPOT" else ""
        need[prefix + machines.GPU_QUOTA[w.gpu_type]] += w.max * w.gpu_count
    return need


def check_project(s: Settings, binary: str) -> bool:
    """PreflightError naming everything missing; True when the quota could be checked too."""
    project = s.infra.project
    found = _gcloud(binary, "projects", "describe", project, "--format=value(projectId)")
    if found.returncode != 0 or found.stdout.strip() != project:
        raise PreflightError(f"project {project!r} does not exist or this identity cannot see it "
                             f"(gcloud projects describe {project}): {found.stderr.strip()[-300:]}")
    listed = _gcloud(binary, "services", "list", "--enabled", f"--project={project}", "--format=value(config.name)")
    enabled = set(listed.stdout.split()) if listed.returncode == 0 else set()
    missing = [api for api in BOOTSTRAP if api not in enabled]
    if missing:
        raise PreflightError(f"APIs Terraform needs before it can enable the others are off in {project}: "
                             f"run `gcloud services enable {' '.join(missing)} --project={project}`")
    if COMPUTE_API not in enabled:
        print(f"{COMPUTE_API} is not enabled yet in {project}: the first phase enables it, then the GPU quota "
              "is checked", flush=True)
        return False
    check_quota(s, binary)
    return True


def check_quota(s: Settings, binary: str, need: Counter[str] | None = None) -> None:
    """PreflightError when the region's GPU quota is below what the topology uses at its maximum (or
    `need`: a sweep's jobs that run at once, infra/sweep.py)."""
    if not (need := gpus_needed(s) if need is None else need):
        return
    region = s.infra.region
    described = _gcloud(binary, "compute", "regions", "describe", region, f"--project={s.infra.project}",
                        "--format=json")
    if described.returncode != 0:
        raise PreflightError(f"cannot read the quotas of {region}: {described.stderr.strip()[-300:]}")
    quotas = {q["metric"]: q for q in json.loads(described.stdout).get("quotas", [])}
    short = [_shortfall(metric, count, quotas.get(metric)) for metric, count in sorted(need.items())]
    if problems := [p for p in short if p]:
        raise PreflightError(f"GPU quota in {region} is too low: {'; '.join(problems)}. Request more in the "
                             "console (IAM & Admin > Quotas) or lower topology.workers.max")
    for metric, count in sorted(need.items()):
        q = quotas[metric]
        if count > q["limit"] - q["usage"]:
            print(f"warning: {metric} in {region}: {q['usage']:g} of {q['limit']:g} already in use, the topology "
                  f"needs {count}: instances may wait for quota", flush=True)


def _shortfall(metric: str, count: int, quota: dict | None) -> str | None:
    if quota is None:
        return f"{metric}: no quota at all (needs {count})"
    if count > quota["limit"]:
        return f"{metric}: limit {quota['limit']:g}, needs {count}"
    return None
