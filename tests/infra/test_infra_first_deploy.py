"""What a first deploy into a fresh project needs from the synthesized stack (issue 13): a pinned image
that can run the harness, APIs as resources, every edge that orders the apply, an alert that fires when
nobody reports, zones that match the topology, and every metadata value escaped."""

from __future__ import annotations

import re

import pytest

from harness.config import ConfigError
from harness.telemetry import metric_names as mn
from infra import settings as infra_settings
from infra.settings import REPO
from infra.vm import literal
from tests.infra.conftest import PROJECT, TOPOLOGIES

TEMPLATES = "google_compute_instance_template"
MIGS = ("google_compute_region_instance_group_manager", "google_compute_instance_group_manager",
        "google_compute_per_instance_config")


def load(*overrides: str) -> infra_settings.Settings:
    return infra_settings.load([f"infra.project={PROJECT}", *overrides])


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_the_image_is_pinned_by_name_and_its_python_is_told_to_the_vm(topologies, topology):
    s = topologies[topology]
    for template in s.resources(TEMPLATES).values():
        image = template["disk"][0]["source_image"]
        assert image == ("projects/deeplearning-platform-release/global/images/"
                         "common-cu129-ubuntu-2404-nvidia-580-v20260819")
        assert "/family/" not in image
        assert template["metadata"]["spot-python"] == "3.12"
        gpus = template.get("guest_accelerator", [{"count": 0}])[0]["count"]
        assert template["metadata"]["spot-gpu-count"] == str(gpus)


def test_an_image_whose_python_cannot_run_the_harness_fails_synth():
    with pytest.raises(ConfigError, match=r"infra.image.python='3.10' .* does not satisfy pyproject.toml's "
                                          r"requires-python '>=3.11'"):
        load("infra.image.python='3.10'")  # quoted: Hydra reads 3.10 as the float 3.1


def test_torch_must_come_from_exactly_one_place():
    with pytest.raises(ConfigError, match=r"no torch on the VMs: infra.image.torch=null .* "
                                          r"infra.wheelhouse.torch=false"):
        load("infra.wheelhouse.torch=false")
    with pytest.raises(ConfigError, match=r"torch twice: infra.image.torch='2.9.0' and infra.wheelhouse.torch=true"):
        load("infra.image.torch=2.9.0")
    load("infra.image.torch=2.9.0", "infra.wheelhouse.torch=false")


def test_an_image_family_path_is_refused():
    with pytest.raises(ConfigError, match=r"infra.image.name='family/common-cu129-\S+' is not valid"):
        load("infra.image.name=family/common-cu129-ubuntu-2404-nvidia-580")


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_apis_are_resources_kept_on_destroy_and_everything_waits_for_them(topologies, topology):
    from infra.constructs.apis import APIS  # the provider bindings: only a worker that synthesizes imports them

    s = topologies[topology]
    services = s.resources("google_project_service")
    assert sorted(v["service"] for v in services.values()) == sorted(APIS)
    assert all(v["disable_on_destroy"] is False for v in services.values())
    names = {f"google_project_service.{n}" for n in services}
    for kind, resources in s.tf["resource"].items():
        if kind != "google_project_service":
            for body in resources.values():
                assert names <= set(body["depends_on"]), kind


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_instance_groups_wait_for_every_grant_their_vms_need(topologies, topology):
    s = topologies[topology]
    grants = {f"{kind}.{name}" for kind in ("google_storage_bucket_iam_member", "google_project_iam_member",
                                            "google_secret_manager_secret_iam_member")
              for name in s.resources(kind)}
    for kind in MIGS:
        for body in s.resources(kind).values():
            assert grants <= set(body["depends_on"]), kind


def test_coordinator_may_read_the_shared_wheels(topologies):
    binding = next(b for b in topologies["all_spot"].resources("google_storage_bucket_iam_member").values()
                   if b["role"] == "roles/storage.objectViewer")
    assert "/objects/releases/" in binding["condition"]["expression"]
    assert "/objects/wheels/" in binding["condition"]["expression"]


def test_the_preemption_alert_waits_until_its_log_metric_can_be_found(topologies, synth):
    s = topologies["hybrid"]
    assert s.tf["terraform"]["required_providers"]["time"]["source"] == "hashicorp/time"
    (sleep_name, sleep), = s.resources("time_sleep").items()
    assert sleep["create_duration"] == "600s"
    metric = next(iter(s.resources("google_logging_metric")))
    assert f"google_logging_metric.{metric}" in sleep["depends_on"]
    policy = next(p for p in s.resources("google_monitoring_alert_policy").values()
                  if p["conditions"][0]["display_name"] == "preemptions")
    assert f"time_sleep.{sleep_name}" in policy["depends_on"]
    assert not synth("infra.alerts.log_metric_wait_s=0").resources("time_sleep")


def test_an_absence_alert_fires_when_nobody_reports_steps(synth):
    s = synth("infra.alerts.absent_min=20")
    policies = {p["conditions"][0]["display_name"]: p for p in s.resources("google_monitoring_alert_policy").values()}
    absent = policies["absent"]["conditions"][0]["condition_absent"]
    assert absent["filter"] == f'resource.type="global" AND metric.type="{mn.LAST_STEP}"'
    assert absent["duration"] == "1200s"
    assert "stalled" in policies, "the changes() condition stays beside it"
    with pytest.raises(ConfigError, match=r"infra.alerts.absent_min=1 is not allowed; use 2-1440"):
        load("infra.alerts.absent_min=1")


def test_every_alert_names_its_runbook_step_in_the_readme(topologies):
    from infra.constructs.monitoring import RUNBOOK

    readme = (REPO / "README.md").read_text()
    for policy in topologies["hybrid"].resources("google_monitoring_alert_policy").values():
        step = RUNBOOK[policy["conditions"][0]["display_name"]]
        assert f'step "{step}"' in policy["documentation"]["content"]
        assert f"**{step}**" in readme, f"README lacks runbook step {step!r}"


def test_without_a_notification_channel_synth_warns():
    assert any("no notification channel" in w for w in infra_settings.warnings(load()))
    assert not any("notification" in w for w in infra_settings.warnings(load("infra.alerts.emails=[a@b.example]")))


def test_hybrid_workers_default_to_the_masters_zone(topologies):
    s = topologies["hybrid"]
    workers = s.one("google_compute_region_instance_group_manager")
    master = s.one("google_compute_instance_group_manager")
    assert workers["distribution_policy_zones"] == [master["zone"]] == ["us-central1-a"]
    assert not any("zones" in w for w in infra_settings.warnings(s.settings))
    # all_spot has no training master: the workers may use every zone, in one zone at a time.
    spot = topologies["all_spot"].one("google_compute_region_instance_group_manager")
    assert spot["distribution_policy_zones"] == ["us-central1-a", "us-central1-b", "us-central1-c"]
    assert spot["distribution_policy_target_shape"] == "ANY_SINGLE_ZONE"
    assert not any("zones" in w for w in infra_settings.warnings(topologies["all_spot"].settings))


def test_spreading_across_zones_is_explicit_and_warns_with_the_price(synth):
    s = synth("topology.workers.zones=[us-central1-b,us-central1-c]")
    assert s.one("google_compute_region_instance_group_manager")["distribution_policy_zones"] == [
        "us-central1-b", "us-central1-c"]
    (warning,) = [w for w in infra_settings.warnings(s.settings) if "zones" in w]
    assert "us-central1-a, us-central1-b, us-central1-c" in warning and "$0.01/GB" in warning
    spread = load("topology=all_spot", "topology.workers.distribution=BALANCED")
    assert any("$0.01/GB" in w for w in infra_settings.warnings(spread))
    with pytest.raises(ConfigError, match=r"topology.workers.zones\[0\]='europe-west4-a' is outside infra.region"):
        load("topology.workers.zones=[europe-west4-a]")


def test_every_metadata_value_is_escaped(synth):
    overrides = ["run.dir=/mnt/${run.name}", "wandb.project='team%{x}'"]
    s = synth(*overrides)
    meta = s.template("worker")["metadata"]
    value = meta["spot-hydra-overrides"]
    assert "run.dir=/mnt/$${run.name}" in value and "wandb.project='team%%{x}'" in value
    for key, v in meta.items():
        if key not in ("spot-rdzv-endpoint", "spot-bucket"):
            assert not re.search(r"(?<!\$)\$\{|(?<!%)%\{", v), key  # no interpolation, no directive
    # The references stay interpolations.
    assert meta["spot-bucket"].startswith("${google_storage_bucket.")
    assert meta["spot-rdzv-endpoint"].startswith("${google_compute_address.")
    assert literal("a${b}%{c}") == "a$${b}%%{c}"


def test_data_access_audit_logs_back_the_checkov_allowlist(topologies, synth):
    (audit,) = topologies["hybrid"].resources("google_project_iam_audit_config").values()
    assert audit["service"] == "storage.googleapis.com"
    assert sorted(c["log_type"] for c in audit["audit_log_config"]) == ["DATA_READ", "DATA_WRITE"]
    assert not synth("infra.bucket.data_access_logs=false").resources("google_project_iam_audit_config")
