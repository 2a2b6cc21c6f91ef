"""The deployment: one thin stack composing the constructs, synthesized to plain Terraform JSON
(<outdir>/stacks/<infra.name>/cdk.tf.json) that Terraform or OpenTofu apply directly.

CDKTF is deprecated upstream (December 2025): all logic lives in settings and the constructs, and the
output uses nothing CDKTF-specific, so the JSON can be kept and applied without CDKTF.

Order on a fresh project: every resource depends on the APIs it needs being enabled; `make deploy`
applies the FOUNDATION constructs first (APIs, bucket, identities and their grants), publishes the
release, then applies the rest, so no VM boots before its release and its permissions exist."""

from __future__ import annotations

from pathlib import Path

from cdktf import App, Fn, GcsBackend, LocalBackend, TerraformOutput, TerraformResource, TerraformStack
from cdktf_cdktf_provider_google.provider import GoogleProvider
from cdktf_cdktf_provider_time.provider import TimeProvider
from constructs import Construct

from infra.constructs.apis import Apis
from infra.constructs.compute import Compute
from infra.constructs.iam import Identities
from infra.constructs.monitoring import Monitoring
from infra.constructs.network import Network
from infra.constructs.storage import CheckpointBucket, checkpoint_prefix
from infra.release import RELEASES
from infra.settings import REPO, Settings
from infra.vm import startup_scripts

STATE_DIR = REPO / "infra" / "state"  # local Terraform state (git-ignored), outside the synth output
# Construct ids of make deploy's first phase: everything the release upload and a booting VM need.
FOUNDATION = ("apis", "storage", "iam")


def providers_and_backend(stack: TerraformStack, i) -> None:
    """The providers (google; time for time_sleep, see infra/constructs/monitoring.py) and where the
    state lives (`infra.state_bucket`, else a local file), for every stack of a deployment."""
    GoogleProvider(stack, "google", project=i.project, region=i.region, default_labels=dict(i.labels))
    TimeProvider(stack, "time")
    if i.state_bucket:
        GcsBackend(stack, bucket=i.state_bucket, prefix=f"terraform/{i.name}")
    else:
        LocalBackend(stack, path=str(STATE_DIR / f"{i.name}.tfstate"))


class TrainingStack(TerraformStack):
    def __init__(self, scope: Construct, settings: Settings, release: str):
        i = settings.infra
        super().__init__(scope, i.name)
        scripts = startup_scripts(settings)  # first: a missing script fails before anything is built
        providers_and_backend(self, i)

        apis = Apis(self, "apis", settings)
        storage = CheckpointBucket(self, "storage", settings)
        identities = Identities(self, "iam", settings, storage.bucket)
        network = Network(self, "network", settings, identities)
        compute = Compute(self, "compute", settings, network, identities, storage.bucket, scripts, release)
        monitoring = Monitoring(self, "monitoring", settings)

        bucket_url = f"gs://{storage.bucket.name}"
        dashboard_id = Fn.element(Fn.split("/", monitoring.dashboard.id), 3)
        outputs = {
            "bucket_url": bucket_url,
            "checkpoint_store": f"{bucket_url}/{checkpoint_prefix(settings.run_id)}",
            "release_url": f"{bucket_url}/{RELEASES}/{release}/",
            "master_mig": compute.master_mig.name,
            "worker_mig": compute.worker_mig.name,
            "rendezvous_endpoint": compute.rdzv_endpoint,
            "dashboard_url": f"https://console.cloud.google.com/monitoring/dashboards/builder/{dashboard_id}"
                             f"?project={i.project}",
        }
        for key, value in outputs.items():
            TerraformOutput(self, key, value=value)
        self._after(apis.services)

    def _after(self, services: list) -> None:
        """Make every other resource depend on the enabled APIs (a fresh project has none of them)."""
        names = [f"{s.terraform_resource_type}.{s.friendly_unique_id}" for s in services]
        for node in self.node.find_all():
            if isinstance(node, TerraformResource) and node not in services:
                node.depends_on = [*(node.depends_on or []), *names]


def synth(settings: Settings, release: str) -> Path:
    """Write the stack's Terraform JSON under infra.outdir; returns the stack directory."""
    outdir = settings.path(settings.infra.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    app = App(outdir=str(outdir))
    TrainingStack(app, settings, release)
    app.synth()
    return outdir / "stacks" / settings.infra.name
