"""Properties of the synthesized Terraform JSON of each topology, and how config changes it."""

from __future__ import annotations

import re

import pytest

from harness import config as job_config
from harness.config import ConfigError
from harness.telemetry import metric_names as mn
from harness.telemetry.monitoring_sink import METRICS as SINK_METRICS
from infra.vm import PD_DEVICE, job_overrides
from tests.infra.conftest import REAL_STARTUP, TOPOLOGIES, real_startup_present

TEMPLATES = "google_compute_instance_template"


def unescape(value: str) -> str:
    """What Terraform makes of a JSON string literal without interpolations: `$${` -> `${`, `%%{` -> `%{`."""
    return value.replace("$${", "${").replace("%%{", "%{")


@pytest.mark.parametrize("topology", ["hybrid", "all_spot"])
def test_worker_template_is_spot_terminating_on_maintenance(topologies, topology):
    scheduling = topologies[topology].template("worker")["scheduling"]
    assert scheduling["provisioning_model"] == "SPOT" and scheduling["preemptible"] is True
    assert scheduling["instance_termination_action"] == "DELETE"
    assert scheduling["on_host_maintenance"] == "TERMINATE"
    assert scheduling["automatic_restart"] is False


def test_termination_action_comes_from_config(synth):
    scheduling = synth("infra.instance_termination_action=STOP").template("worker")["scheduling"]
    assert scheduling["instance_termination_action"] == "STOP"


def test_on_demand_topology_has_no_spot(topologies):
    for template in topologies["on_demand"].resources(TEMPLATES).values():
        assert template["scheduling"]["provisioning_model"] == "STANDARD"
        assert "instance_termination_action" not in template["scheduling"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_no_external_ip_anywhere(topologies, topology):
    s = topologies[topology]
    assert not s.resources("google_compute_instance"), "nodes come only from MIG templates"
    for template in s.resources(TEMPLATES).values():
        for nic in template["network_interface"]:
            assert "access_config" not in nic and "ipv6_access_config" not in nic
    for address in s.resources("google_compute_address").values():
        assert address["address_type"] == "INTERNAL"
    nat = s.one("google_compute_router_nat")
    assert nat["source_subnetwork_ip_ranges_to_nat"] == "LIST_OF_SUBNETWORKS"
    assert s.one("google_compute_subnetwork")["private_ip_google_access"] is True


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_templates_are_hardened(topologies, topology):
    for template in topologies[topology].resources(TEMPLATES).values():
        meta = template["metadata"]
        assert (meta["enable-oslogin"], meta["block-project-ssh-keys"], meta["serial-port-enable"]) == (
            "TRUE", "TRUE", "FALSE")
        shielded = template["shielded_instance_config"]
        assert shielded["enable_vtpm"] and shielded["enable_integrity_monitoring"]
        assert "iam_trainer" in template["service_account"]["email"] or "iam_coordinator" in \
            template["service_account"]["email"]


def test_bucket_is_private_with_lifecycle(topologies):
    s = topologies["hybrid"]
    bucket = s.one("google_storage_bucket")
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["name"] == "test-project-123-spot-ckpt"
    assert bucket["versioning"] == {"enabled": False}
    assert bucket["soft_delete_policy"] == {"retention_duration_seconds": 0}
    rules = {(r["action"]["type"], tuple(r["condition"].get("matches_prefix", []))): r["condition"]
             for r in bucket["lifecycle_rule"]}
    assert rules[("Delete", ("runs/default/checkpoints/tmp/",))]["age"] == 1
    nearline = rules[("SetStorageClass", ("runs/",))]
    assert nearline["age"] == 30
    assert s.tf["provider"]["google"][0]["default_labels"] == {"app": "spot-training"}


def test_bucket_choices_follow_config(synth):
    bucket = synth("infra.bucket.versioning=true", "infra.bucket.soft_delete_days=7",
                   "infra.bucket.nearline_after_days=14", "run.name=exp1").one("google_storage_bucket")
    assert bucket["versioning"] == {"enabled": True}
    assert bucket["soft_delete_policy"] == {"retention_duration_seconds": 7 * 86400}
    actions = {r["action"]["type"]: r["condition"] for r in bucket["lifecycle_rule"]}
    assert actions["SetStorageClass"]["age"] == 14
    assert any(r["condition"].get("matches_prefix") == ["runs/exp1/checkpoints/tmp/"] for r in bucket["lifecycle_rule"])
    assert any(r["condition"].get("with_state") == "ARCHIVED" for r in bucket["lifecycle_rule"])


def test_alert_thresholds_and_addresses_come_from_config(synth):
    s = synth("infra.alerts.emails=[ops@example.com,ml@example.org]", "infra.alerts.goodput_below=0.65",
              "infra.alerts.goodput_window_min=20", "infra.alerts.preemptions_per_hour=3",
              "infra.alerts.stall_min=45")
    channels = s.resources("google_monitoring_notification_channel")
    assert sorted(c["labels"]["email_address"] for c in channels.values()) == ["ml@example.org", "ops@example.com"]
    policies = {p["conditions"][0]["display_name"]: p for p in s.resources("google_monitoring_alert_policy").values()}
    assert set(policies) == {"goodput", "preemptions", "stalled", "absent"}
    for policy in policies.values():
        assert sorted(policy["notification_channels"]) == sorted(
            f"${{google_monitoring_notification_channel.{name}.id}}" for name in channels)
    goodput = policies["goodput"]["conditions"][0]["condition_threshold"]
    assert goodput["threshold_value"] == 0.65 and goodput["duration"] == "1200s"
    assert goodput["comparison"] == "COMPARISON_LT" and f'"{mn.GOODPUT}"' in goodput["filter"]
    preemptions = policies["preemptions"]["conditions"][0]["condition_threshold"]
    assert preemptions["threshold_value"] == 3 and preemptions["aggregations"][0]["alignment_period"] == "3600s"
    assert "logging.googleapis.com/user/" in preemptions["filter"]
    query = policies["stalled"]["conditions"][0]["condition_prometheus_query_language"]["query"]
    step = 'custom_googleapis_com:spot_training_last_completed_step{monitored_resource="global"}'
    assert query == f"changes({step}[45m]) < 1"
    assert mn.LAST_STEP == "custom.googleapis.com/spot_training/last_completed_step"


def test_preemption_log_metric_counts_this_deployments_preemptions(topologies):
    metric = topologies["hybrid"].one("google_logging_metric")
    assert 'protoPayload.methodName="compute.instances.preempted"' in metric["filter"]
    assert "cloudaudit.googleapis.com%2Fsystem_event" in metric["filter"]
    assert 'protoPayload.resourceName:"/instances/spot-train-"' in metric["filter"]


def test_metric_descriptors_match_what_the_harness_writes(topologies):
    descriptors = {d["type"]: d for d in topologies["hybrid"].resources("google_monitoring_metric_descriptor").values()}
    assert set(descriptors) == set(mn.ALL)
    for metric_type, kind in SINK_METRICS.values():
        d = descriptors[metric_type]
        assert d["metric_kind"] == "GAUGE"
        assert d["value_type"] == ("DOUBLE" if kind is float else "INT64")
        assert [label["key"] for label in d["labels"]] == ["job"]  # harness/telemetry/telemetry.py's label
    dashboard = topologies["hybrid"].one("google_monitoring_dashboard")["dashboard_json"]
    for needed in (mn.GOODPUT, mn.STEPS_PER_SECOND, "logging.googleapis.com/user/", "instance_group/size"):
        assert needed in dashboard


@pytest.mark.skipif(not real_startup_present(), reason="startup/startup.sh and startup/shutdown.sh are not "
                    "written yet (another change brings them); the byte-identical check needs the real files")
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_startup_scripts_in_metadata_are_byte_identical(topologies, topology):
    for template in topologies[topology].resources(TEMPLATES).values():
        for key, name in (("startup-script", "startup.sh"), ("shutdown-script", "shutdown.sh")):
            value = template["metadata"][key]
            # Escaped: Terraform would otherwise read the script's ${VAR} as interpolations.
            assert not re.search(r"(?<!\$)\$\{|(?<!%)%\{", value)
            assert unescape(value).encode() == (REAL_STARTUP / name).read_bytes()


def test_missing_startup_script_fails_with_a_clear_message(synth, tmp_path):
    with pytest.raises(ConfigError, match=r"infra.startup_dir=.*startup.sh is missing"):
        synth(f"infra.startup_dir={tmp_path}")


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_autohealing_probes_the_health_port(topologies, topology):
    s = topologies[topology]
    workers = s.one("google_compute_region_instance_group_manager")
    check = s.one("google_compute_health_check", "/healthz")
    assert workers["auto_healing_policies"]["health_check"] == f"${{{s.ref(check, 'google_compute_health_check')}.id}}"
    assert check["http_health_check"] == {"port": 8888, "request_path": "/healthz"}
    assert workers["named_port"] == [{"name": "healthz", "port": 8888}]


def test_health_port_follows_the_harness_config(synth):
    s = synth("health.port=9100")
    assert s.one("google_compute_health_check", "/healthz")["http_health_check"]["port"] == 9100
    assert s.one("google_compute_firewall", "/allow-health-checks")["allow"] == [{"ports": ["9100"], "protocol": "tcp"}]
    assert s.template("worker")["metadata"]["spot-health-port"] == "9100"


def test_updates_never_restart_a_running_job(topologies):
    s = topologies["hybrid"]
    workers = s.one("google_compute_region_instance_group_manager")["update_policy"]
    assert workers["type"] == "OPPORTUNISTIC" and workers["instance_redistribution_type"] == "NONE"
    master = s.one("google_compute_instance_group_manager")["update_policy"]
    assert master["type"] == "OPPORTUNISTIC"


def test_hybrid_master_is_an_on_demand_gpu_trainer_with_a_persistent_disk(topologies):
    s = topologies["hybrid"]
    template = s.template("master")
    assert template["scheduling"]["provisioning_model"] == "STANDARD"
    assert template["guest_accelerator"] == [{"count": 1, "type": "nvidia-tesla-a100"}]
    assert template["metadata"]["spot-role"] == "master"
    disk = next(d for d in template["disk"] if d.get("device_name") == PD_DEVICE)
    assert disk["type"] == "PERSISTENT" and disk["disk_size_gb"] == 500
    mig = s.one("google_compute_instance_group_manager")
    assert mig["stateful_disk"] == [{"delete_rule": "ON_PERMANENT_INSTANCE_DELETION", "device_name": PD_DEVICE}]
    assert mig["auto_healing_policies"]["health_check"].startswith("${google_compute_health_check.")
    instance = s.one("google_compute_per_instance_config")
    assert instance["name"] == "spot-train-master"
    address = instance["preserved_state"]["internal_ip"][0]["ip_address"]["address"]
    assert address.startswith("${google_compute_address.")
    assert s.tf["output"]["rendezvous_endpoint"]["value"].endswith(".address}:29400")
    assert template["metadata"]["spot-rdzv-endpoint"] == s.tf["output"]["rendezvous_endpoint"]["value"]


def test_all_spot_coordinator_is_on_demand_and_hosts_only_the_rendezvous(topologies):
    s = topologies["all_spot"]
    template = s.template("coordinator")
    assert template["scheduling"]["provisioning_model"] == "STANDARD"
    assert template["scheduling"]["preemptible"] is False
    assert template["scheduling"]["on_host_maintenance"] == "MIGRATE"  # live-migrates: the store stays up
    assert "guest_accelerator" not in template and template["machine_type"] == "e2-standard-2"
    assert template["metadata"]["spot-role"] == "coordinator"
    assert "spot-hydra-overrides" not in template["metadata"]
    assert "iam_coordinator" in template["service_account"]["email"]
    check = s.one("google_compute_health_check", "/rdzv-check")
    assert check["tcp_health_check"] == {"port": 29400}
    mig = s.one("google_compute_instance_group_manager")
    assert mig["auto_healing_policies"]["health_check"] == f"${{{s.ref(check, 'google_compute_health_check')}.id}}"
    assert s.template("worker")["metadata"]["spot-nnodes"] == "2:4"  # the coordinator does not train


def test_firewall_opens_only_what_the_job_needs(topologies):
    s = topologies["all_spot"]
    rules = {r["//"]["metadata"]["path"].rsplit("/", 1)[-1]: r for r in s.resources("google_compute_firewall").values()}
    for rule in rules.values():
        assert rule["direction"] == "INGRESS" and "0.0.0.0/0" not in rule.get("source_ranges", [])
        assert rule["target_service_accounts"], "every rule targets service accounts"
    collective = rules["allow-collective"]
    assert collective["source_service_accounts"] == collective["target_service_accounts"]
    assert collective["allow"][0]["ports"] == ["29400", "1024-65535"]
    assert rules["allow-iap-ssh"]["source_ranges"] == ["35.235.240.0/20"]
    assert rules["allow-iap-ssh"]["allow"] == [{"ports": ["22"], "protocol": "tcp"}]
    assert rules["allow-health-checks"]["allow"] == [{"ports": ["8888"], "protocol": "tcp"}]
    assert rules["allow-health-checks"]["source_ranges"] == ["35.191.0.0/16", "130.211.0.0/22"]
    assert rules["allow-rendezvous"]["allow"] == [{"ports": ["29400"], "protocol": "tcp"}]


def test_identities_are_least_privilege(topologies):
    s = topologies["all_spot"]
    project_roles = sorted(m["role"] for m in s.resources("google_project_iam_member").values())
    predefined = [r for r in project_roles if r.startswith("roles/")]
    assert predefined == ["roles/logging.logWriter"] * 2 + ["roles/monitoring.metricWriter"] * 2
    # The one custom role: resizing the deployment's groups at the job's end (tests/infra/test_infra_job_end.py).
    assert [r.split(".")[0] for r in project_roles if r not in predefined] == ["${google_project_iam_custom_role"]
    bindings = {m["role"]: m for m in s.resources("google_storage_bucket_iam_member").values()}
    assert "iam_trainer" in bindings["roles/storage.objectUser"]["member"]
    assert bindings["roles/storage.objectUser"]["bucket"].startswith("${google_storage_bucket.")
    assert "/objects/releases/" in bindings["roles/storage.objectViewer"]["condition"]["expression"]
    accessor = s.one("google_secret_manager_secret_iam_member")
    assert accessor["role"] == "roles/secretmanager.secretAccessor" and "iam_trainer" in accessor["member"]
    assert not s.resources("google_secret_manager_secret_version"), "the secret's value never enters state"


def test_overrides_change_the_output(topologies, synth):
    default = topologies["hybrid"]
    bigger = synth("topology.workers.max=8")
    assert default.one("google_compute_region_instance_group_manager")["target_size"] == 4
    assert bigger.one("google_compute_region_instance_group_manager")["target_size"] == 8
    assert bigger.template("worker")["metadata"]["spot-nnodes"] == "2:9"

    moved = synth("infra.region=europe-west4", "infra.zones=[europe-west4-a,europe-west4-b]",
                  "topology.workers.zones=[europe-west4-a,europe-west4-b]", "topology.workers.distribution=BALANCED")
    workers = moved.one("google_compute_region_instance_group_manager")
    assert workers["region"] == "europe-west4"
    assert workers["distribution_policy_zones"] == ["europe-west4-a", "europe-west4-b"]
    assert workers["distribution_policy_target_shape"] == "BALANCED"
    assert workers["update_policy"]["max_unavailable_fixed"] == 2
    assert moved.one("google_compute_instance_group_manager")["zone"] == "europe-west4-a"
    assert moved.one("google_compute_subnetwork")["region"] == "europe-west4"
    assert moved.one("google_storage_bucket")["location"] == "EUROPE-WEST4"


def test_state_backend(topologies, synth):
    assert topologies["hybrid"].tf["terraform"]["backend"]["local"]["path"].endswith("infra/state/spot-train.tfstate")
    gcs = synth("infra.state_bucket=my-tf-state").tf["terraform"]["backend"]
    assert gcs == {"gcs": {"bucket": "my-tf-state", "prefix": "terraform/spot-train"}}


def test_outputs(topologies):
    outputs = topologies["hybrid"].tf["output"]
    assert set(outputs) >= {"bucket_url", "master_mig", "worker_mig", "rendezvous_endpoint", "dashboard_url"}
    assert outputs["dashboard_url"]["value"].startswith("https://console.cloud.google.com/monitoring/dashboards/")


def test_job_on_the_vms_composes_with_monitoring_on(topologies):
    """The overrides the VMs replay are valid for the job, and turn on the sink the alerts watch."""
    s = topologies["hybrid"]
    overrides = s.template("worker")["metadata"]["spot-hydra-overrides"].split(" ")
    assert overrides == job_overrides(s.settings, "worker")
    cfg = job_config.load(overrides)
    telemetry = job_config.telemetry_config(cfg.telemetry)
    assert telemetry.monitoring.enabled and telemetry.monitoring.project == "test-project-123"
    assert telemetry.cost_basis.machine_type == "a2-highgpu-1g" and telemetry.cost_basis.spot_nodes == 4
    assert telemetry.cost_basis.on_demand_nodes == 1


def test_wandb_secret_only_when_wandb_is_online(topologies, synth):
    assert "spot-wandb-secret" not in topologies["hybrid"].template("worker")["metadata"]
    online = synth("wandb.mode=online")
    assert online.template("worker")["metadata"]["spot-wandb-secret"] == "wandb-api-key"
