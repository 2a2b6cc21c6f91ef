"""The sweep's stack (infra/sweep.py): the shared constructs of infra/stacks.py once, then one Compute
per job, synthesized to <outdir>/stacks/<infra.name>/cdk.tf.json like a single deployment's, with the
same construct ids for the foundation (`make deploy`'s first phase)."""

from __future__ import annotations

from pathlib import Path

from cdktf import App, Fn, TerraformOutput, TerraformStack
from constructs import Construct

from infra.constructs.apis import Apis
from infra.constructs.compute import Compute
from infra.constructs.iam import Identities
from infra.constructs.monitoring import Monitoring
from infra.constructs.network import Network
from infra.constructs.storage import CheckpointBucket
from infra.release import RELEASES
from infra.stacks import TrainingStack, providers_and_backend
from infra.sweep import Deployment
from infra.vm import startup_scripts


class SweepStack(TerraformStack):
    def __init__(self, scope: Construct, dep: Deployment, release: str, finished: set[str]):
        s, i = dep.base, dep.base.infra
        super().__init__(scope, i.name)
        scripts = startup_scripts(s)
        providers_and_backend(self, i)

        apis = Apis(self, "apis", s)
        storage = CheckpointBucket(self, "storage", s)
        identities = Identities(self, "iam", s, storage.bucket, resize_groups=dep.groups())
        network = Network(self, "network", s, identities)
        monitoring = Monitoring(self, "monitoring", s)
        sizes = {e.run: e.size for e in dep.queue.to_start(finished)}
        self.jobs = [Compute(self, f"job{job.index}", js, network, identities, storage.bucket, scripts, release,
                             workers_size=sizes.get(job.run_name, 0), trainer_metadata=dep.queue_metadata())
                     for job, js in zip(dep.sweep.jobs, dep.jobs, strict=True)]

        bucket_url = f"gs://{storage.bucket.name}"
        dashboard_id = Fn.element(Fn.split("/", monitoring.dashboard.id), 3)
        outputs = {
            "bucket_url": bucket_url,
            "release_url": f"{bucket_url}/{RELEASES}/{release}/",
            "sweep": dep.sweep.name,
            "runs": [job.run_name for job in dep.sweep.jobs],
            "worker_migs": [c.worker_mig.name for c in self.jobs],
            "master_migs": [c.master_mig.name for c in self.jobs],
            "rendezvous_endpoints": [c.rdzv_endpoint for c in self.jobs],
            "dashboard_url": f"https://console.cloud.google.com/monitoring/dashboards/builder/{dashboard_id}"
                             f"?project={i.project}",
        }
        for key, value in outputs.items():
            TerraformOutput(self, key, value=value)
        TrainingStack._after(self, apis.services)  # type: ignore[arg-type]  # every resource after the APIs


def synth(dep: Deployment, release: str, finished: set[str]) -> Path:
    outdir = dep.base.path(dep.base.infra.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    app = App(outdir=str(outdir))
    SweepStack(app, dep, release, finished)
    app.synth()
    return outdir / "stacks" / dep.base.infra.name
