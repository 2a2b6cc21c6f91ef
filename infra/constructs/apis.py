"""The Google Cloud APIs the deployment uses, enabled by the stack itself, so that a fresh project
needs only the two that Terraform itself needs first (`BOOTSTRAP`, checked by `make deploy`).

They are kept on destroy (`disable_on_destroy=false`): disabling an API would break whatever else in
the project uses it, and enabling one costs nothing."""

from __future__ import annotations

from cdktf_cdktf_provider_google.project_service import ProjectService
from constructs import Construct

from infra.settings import Settings

# Service Usage enables the others; Resource Manager answers the provider's project look-ups.
BOOTSTRAP = ("serviceusage.googleapis.com", "cloudresourcemanager.googleapis.com")
APIS = (
    "compute.googleapis.com",  # VMs, instance groups, network, health checks
    "iam.googleapis.com",  # service accounts
    "iap.googleapis.com",  # SSH through IAP TCP forwarding
    "logging.googleapis.com",  # the job's logs, the preemption log metric
    "monitoring.googleapis.com",  # the harness's metrics, alert policies, dashboard
    "secretmanager.googleapis.com",  # the W&B key
    "storage.googleapis.com",  # the checkpoint bucket and the release
)


class Apis(Construct):
    def __init__(self, scope: Construct, id_: str, settings: Settings):
        super().__init__(scope, id_)
        self.services = [
            ProjectService(self, api.split(".", 1)[0], project=settings.infra.project, service=api,
                           disable_on_destroy=False, disable_dependent_services=False)
            for api in APIS]
