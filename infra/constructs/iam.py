"""Identities of the nodes, with least privilege: training nodes read and write objects of the
checkpoint bucket only (a bucket-level binding), write logs and metrics, read the W&B key, and resize
this deployment's two instance groups (a custom role holding that one permission, conditioned on the
groups' names: the job's end, harness/job_end.py); a rendezvous-only coordinator may only read the
published release, its wheels and its Ops Agent package. Nothing else, nowhere else. Writing logs
(roles/logging.logWriter) is what the Ops Agent ships the job's journal with (infra/logs.py)."""

from __future__ import annotations

from cdktf import TerraformResource
from cdktf_cdktf_provider_google.project_iam_custom_role import ProjectIamCustomRole
from cdktf_cdktf_provider_google.project_iam_member import ProjectIamMember, ProjectIamMemberCondition
from cdktf_cdktf_provider_google.secret_manager_secret import (
    SecretManagerSecret,
    SecretManagerSecretReplication,
    SecretManagerSecretReplicationAuto,
)
from cdktf_cdktf_provider_google.secret_manager_secret_iam_member import SecretManagerSecretIamMember
from cdktf_cdktf_provider_google.service_account import ServiceAccount
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from cdktf_cdktf_provider_google.storage_bucket_iam_member import (
    StorageBucketIamMember,
    StorageBucketIamMemberCondition,
)
from constructs import Construct

from harness import job_end
from infra import vm
from infra.release import AGENTS, RELEASES, WHEELS
from infra.settings import Settings

NODE_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")


class Identities(Construct):
    """`trainer`: the service account of every training node; `coordinator`: the rendezvous-only
    master's (None when the master trains)."""

    def __init__(self, scope: Construct, id_: str, settings: Settings, bucket: StorageBucket,
                 resize_groups: list[str] | None = None):
        super().__init__(scope, id_)
        i = settings.infra
        # Every grant a node needs at boot: the instance groups depend on all of them (a VM booting
        # before its bucket binding exists gets 403 on the release).
        self.bindings: list[TerraformResource] = []
        self.trainer = self._account("trainer", f"{i.name}-train", "Spot training nodes", settings)
        self.bindings.append(StorageBucketIamMember(
            self, "trainer-objects", bucket=bucket.name, role="roles/storage.objectUser",
            member=self.member(self.trainer)))
        self.bindings.append(self._resize_grant(settings, resize_groups))
        self.coordinator: ServiceAccount | None = None
        if not settings.master_trains:
            self.coordinator = self._account("coordinator", f"{i.name}-rdzv", "Rendezvous coordinator", settings)
            # Bucket-level list (to copy the release folder) and object reads under releases/, wheels/
            # and agents/ only.
            objects = f"projects/_/buckets/{i.bucket.name}/objects"
            self.bindings.append(StorageBucketIamMember(
                self, "coordinator-release", bucket=bucket.name, role="roles/storage.objectViewer",
                member=self.member(self.coordinator),
                condition=StorageBucketIamMemberCondition(
                    title="release-only",
                    expression='resource.type == "storage.googleapis.com/Bucket" || ' + " || ".join(
                        f'resource.name.startsWith("{objects}/{folder}/")' for folder in (RELEASES, WHEELS, AGENTS)))))
        secret_id = i.wandb_secret
        if i.create_wandb_secret:
            # The secret only: its value is added out of band and never enters config or state.
            secret = SecretManagerSecret(
                self, "wandb-secret", secret_id=i.wandb_secret,
                replication=SecretManagerSecretReplication(auto=SecretManagerSecretReplicationAuto()))
            secret_id = secret.secret_id
        self.bindings.append(SecretManagerSecretIamMember(
            self, "trainer-wandb", project=i.project, secret_id=secret_id,
            role="roles/secretmanager.secretAccessor", member=self.member(self.trainer)))

    def _account(self, id_: str, account_id: str, title: str, settings: Settings) -> ServiceAccount:
        account = ServiceAccount(self, id_, account_id=account_id, display_name=f"{settings.infra.name}: {title}")
        for role in NODE_ROLES:
            self.bindings.append(ProjectIamMember(
                self, f"{id_}-{role.rsplit('.', 1)[-1]}", project=settings.infra.project, role=role,
                member=self.member(account)))
        return account

    def _resize_grant(self, settings: Settings, paths: list[str] | None = None) -> ProjectIamMember:
        """The trainers may resize the deployment's instance groups (`paths`; by default the two of
        settings' topology, in a sweep every job's), and nothing else: no other permission, no other
        group (matched by location and name, whatever form the project takes)."""
        i = settings.infra
        first, *rest = i.name.split("-")  # role ids take no '-': spot-train -> spotTrainResizeGroups
        role_id = first + "".join(word.capitalize() for word in rest) + "ResizeGroups"
        role = ProjectIamCustomRole(
            self, "resize-role", project=i.project, role_id=role_id,
            title=f"{i.name}: resize its instance groups", permissions=[job_end.RESIZE_PERMISSION],
            description="Training VMs resize the deployment's instance groups to 0 when the job has finished")
        paths = paths if paths is not None else list(vm.group_paths(settings).values())
        groups = [path.split("/", 2)[2] for path in paths]  # without projects/P/
        return ProjectIamMember(
            self, "trainer-resize", project=i.project, role=role.name, member=self.member(self.trainer),
            condition=ProjectIamMemberCondition(
                title="own-instance-groups",
                expression=" || ".join(f'resource.name.endsWith("/{group}")' for group in groups)))

    @property
    def accounts(self) -> list[ServiceAccount]:
        return [a for a in (self.trainer, self.coordinator) if a is not None]

    @staticmethod
    def member(account: ServiceAccount) -> str:
        return f"serviceAccount:{account.email}"
