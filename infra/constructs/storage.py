"""The checkpoint bucket: private (uniform access, public access prevention enforced), lifecycle
rules that clean temporary objects and move old checkpoints to a cheaper class.

Versioning and soft delete are off by default on purpose: checkpoint retention deletes multi-GB
objects all the time, and both would keep (and bill) every deleted one. A commit is protected by
the harness (manifest written last, generation preconditions), not by object versions.

Object access is audited by Cloud Audit Logs (Data Access) for Cloud Storage, which this construct
turns on for the project (`infra.bucket.data_access_logs`), instead of bucket usage logs, which would
need a second bucket. The audit config is authoritative for storage.googleapis.com in the project."""

from __future__ import annotations

from cdktf_cdktf_provider_google.project_iam_audit_config import (
    ProjectIamAuditConfig,
    ProjectIamAuditConfigAuditLogConfig,
)
from cdktf_cdktf_provider_google.storage_bucket import (
    StorageBucket,
    StorageBucketLifecycleRule,
    StorageBucketLifecycleRuleAction,
    StorageBucketLifecycleRuleCondition,
    StorageBucketSoftDeletePolicy,
    StorageBucketVersioning,
)
from constructs import Construct

from infra.settings import Settings

DAY_S = 86_400
NONCURRENT_KEEP_DAYS = 7  # with versioning on: how long a replaced or deleted object version stays


def checkpoint_prefix(run_id: str) -> str:
    """Where a run's bucket tier lives; startup/startup.sh gives the job gs://<bucket>/runs/<run>/checkpoints."""
    return f"runs/{run_id}/checkpoints"


def _rule(action: str, storage_class: str | None = None, **condition: object) -> StorageBucketLifecycleRule:
    return StorageBucketLifecycleRule(
        action=StorageBucketLifecycleRuleAction(type=action, storage_class=storage_class),
        condition=StorageBucketLifecycleRuleCondition(**condition))


class CheckpointBucket(Construct):
    def __init__(self, scope: Construct, id_: str, settings: Settings):
        super().__init__(scope, id_)
        b = settings.infra.bucket
        rules = [
            _rule("Delete", age=b.tmp_delete_after_days,
                  matches_prefix=[f"{checkpoint_prefix(settings.run_id)}/tmp/"]),
            _rule("AbortIncompleteMultipartUpload", age=1),
            _rule("SetStorageClass", "NEARLINE", age=b.nearline_after_days, matches_prefix=["runs/"],
                  matches_storage_class=["STANDARD"]),
        ]
        if b.versioning:
            rules.append(_rule("Delete", with_state="ARCHIVED", days_since_noncurrent_time=NONCURRENT_KEEP_DAYS))
        self.bucket = StorageBucket(
            self, "bucket", name=b.name, location=settings.infra.region.upper(), storage_class="STANDARD",
            uniform_bucket_level_access=True, public_access_prevention="enforced",
            versioning=StorageBucketVersioning(enabled=b.versioning),
            soft_delete_policy=StorageBucketSoftDeletePolicy(retention_duration_seconds=b.soft_delete_days * DAY_S),
            lifecycle_rule=rules, force_destroy=b.force_destroy)
        if b.data_access_logs:
            ProjectIamAuditConfig(
                self, "data-access-logs", project=settings.infra.project, service="storage.googleapis.com",
                audit_log_config=[ProjectIamAuditConfigAuditLogConfig(log_type=kind)
                                  for kind in ("DATA_READ", "DATA_WRITE")])
