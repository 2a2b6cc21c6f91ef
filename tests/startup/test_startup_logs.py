"""startup/startup.sh hands the Ops Agent the config infra/vm.py puts in the metadata, so the job's
journal reaches Cloud Logging with the run's labels (infra/logs.py).

Real: startup.sh, the metadata (the fake server, holding the attribute exactly as infra/vm.py builds it
for each role from the composed config), the files it writes, the release download and its sha256
check. Stubs, because there is no agent, systemd, dpkg or bucket here: the image's agent is its engine
file (`Vm.install_agent`), `systemctl` and `dpkg` record their calls (tests/startup/stubs), and the
bucket is a folder. What the agent then does with the config is the agent's: the config's shape is
checked against its documented schema in tests/infra/test_infra_logs.py.
"""

from __future__ import annotations

import pytest
import yaml

from infra import logs
from infra import settings as infra_settings
from infra import vm as infra_vm
from tests.startup.startup_vm import AGENT_CONFIG, AGENT_PACKAGE, Vm

RESTART = ["systemctl", "restart", "google-cloud-ops-agent*"]
UNITS = {"master": "spot-train.service", "worker": "spot-train.service", "coordinator": "spot-rendezvous.service"}
DROPIN = "/etc/systemd/system/{unit}.d/spot-logs.conf"


def agent_attribute(role: str, run: str = "run-42") -> str:
    """The spot-ops-agent-config value a VM of `role` gets from a deploy of run `run`."""
    s = infra_settings.load([f"run.name={run}", f"topology={'all_spot' if role == 'coordinator' else 'hybrid'}"])
    group = next(g for g in infra_vm.groups(s) if g.role == role)
    attrs = infra_vm.attributes(s, group, rdzv_endpoint="10.0.0.2:29400", bucket="spot-bkt", release="v7")
    return attrs[logs.CONFIG_KEY]


def as_role(vm: Vm, role: str) -> None:
    vm.metadata.attributes["spot-role"] = role
    vm.metadata.attributes[logs.CONFIG_KEY] = agent_attribute(role)
    if role == "coordinator":
        for key in ("spot-nnodes", "spot-nproc-per-node"):
            del vm.metadata.attributes[key]
    vm.add_ssds(1)
    vm.has_filesystem(vm.pd_device)


def written_labels(vm: Vm) -> dict[str, dict[str, str]]:
    config = yaml.safe_load(vm.path(AGENT_CONFIG).read_text())
    fields = config["logging"]["processors"]["spot_labels"]["fields"]
    return {k.removeprefix("labels."): v for k, v in fields.items()}


def agent_calls(vm: Vm) -> list[list[str]]:
    return [c for c in vm.calls() if c[0] == "dpkg" or (c[0] == "systemctl" and c[1] in ("restart", "start"))]


@pytest.mark.parametrize("role", ["master", "worker", "coordinator"])
def test_the_images_agent_gets_the_roles_labels_and_is_restarted_before_the_job_starts(vm: Vm, role: str):
    as_role(vm, role)
    vm.install_agent()

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    config = vm.path(AGENT_CONFIG)
    assert config.read_text() == vm.metadata.attributes[logs.CONFIG_KEY].rstrip("\n") + "\n"  # byte for byte
    assert config.stat().st_mode & 0o777 == 0o644
    assert written_labels(vm) == {
        "spot_deployment": {"static_value": "spot-train"},
        "spot_run": {"static_value": "run-42"},
        "spot_role": {"static_value": role},
        "spot_vm": {"copy_from": "jsonPayload._HOSTNAME"},
        "spot_incarnation": {"copy_from": "jsonPayload._BOOT_ID"},
    }
    (kept,) = yaml.safe_load(config.read_text())["logging"]["processors"]["spot_only_the_job"]["match_any"]
    assert f'jsonPayload._SYSTEMD_UNIT = "{UNITS[role]}"' in kept
    # The agent runs the new config before the job's first line.
    assert agent_calls(vm) == [RESTART, ["systemctl", "start", UNITS[role]]]
    assert "ops agent: wrote" in result.stderr
    # At shutdown the agent stops after the job's unit and after shutdown.sh, so their last lines ship.
    for unit in (UNITS[role], "google-shutdown-scripts.service"):
        dropin = vm.path(DROPIN.format(unit=unit)).read_text().splitlines()
        assert "[Unit]" in dropin
        assert "After=google-cloud-ops-agent.service google-cloud-ops-agent-fluent-bit.service " \
               "google-cloud-ops-agent-opentelemetry-collector.service" in dropin


def test_a_reboot_restarts_the_agent_only_when_the_config_changed(vm: Vm):
    as_role(vm, "worker")
    vm.install_agent()
    assert vm.startup().returncode == 0
    vm.reboot()
    vm.clear_calls()

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert RESTART not in vm.calls("systemctl")
    assert "config.yaml is unchanged" in result.stderr
    # A new run on the same disk (a template whose run changed) relabels from then on.
    vm.metadata.attributes[logs.CONFIG_KEY] = agent_attribute("worker", run="run-43")
    vm.reboot()
    vm.clear_calls()
    assert vm.startup().returncode == 0
    assert RESTART in vm.calls("systemctl")
    assert written_labels(vm)["spot_run"] == {"static_value": "run-43"}


def test_an_image_without_the_agent_installs_the_one_the_release_carries(vm: Vm):
    as_role(vm, "master")
    vm.publish_release("v7", agent=True)

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    package = vm.release_dir() / "agents" / AGENT_PACKAGE
    assert package.read_bytes() == b"ops agent package"  # downloaded, its sha256 checked with the rest
    assert agent_calls(vm) == [
        ["dpkg", "--install", "--force-confold", str(package)],
        RESTART,
        ["systemctl", "start", "spot-train.service"],
    ]
    assert written_labels(vm)["spot_role"] == {"static_value": "master"}
    # Installed and configured before the preflight, so a preflight failure reaches Cloud Logging too.
    calls = vm.calls()
    preflight = next(i for i, c in enumerate(calls) if c[:2] == ["venv-python", "-"])
    assert calls.index(RESTART) < preflight


def test_a_tampered_agent_package_is_never_installed(vm: Vm):
    as_role(vm, "worker")
    vm.publish_release("v7", agent=True, corrupt=f"agents/{AGENT_PACKAGE}")

    result = vm.startup()

    assert result.returncode == 1
    assert "failed its sha256 check" in result.stderr and AGENT_PACKAGE in result.stderr
    assert vm.calls("dpkg") == []


def test_without_an_agent_the_job_starts_and_the_script_says_where_its_logs_are(vm: Vm):
    as_role(vm, "worker")

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert not vm.path(AGENT_CONFIG).exists()
    assert agent_calls(vm) == [["systemctl", "start", "spot-train.service"]]
    assert "ops agent: not installed, and release v7 carries no package (infra.logs.agent_package): " \
           "the job's logs stay in this VM's journal" in result.stderr


@pytest.mark.parametrize("failure", ["STUB_DPKG_RC", "STUB_SYSTEMCTL_RESTART_RC"])
def test_an_agent_that_fails_never_stops_the_boot(vm: Vm, failure: str):
    as_role(vm, "worker")
    vm.publish_release("v7", agent=True)

    result = vm.startup(**{failure: "1"})

    assert result.returncode == 0, result.stderr
    assert ["systemctl", "start", "spot-train.service"] in vm.calls("systemctl")
    if failure == "STUB_DPKG_RC":
        assert "dpkg --install" in result.stderr and "failed" in result.stderr
        assert not vm.path(AGENT_CONFIG).exists()
    else:
        assert "the agent did not restart" in result.stderr


def test_a_template_without_the_logs_config_leaves_the_agent_alone(vm: Vm):
    as_role(vm, "worker")
    del vm.metadata.attributes[logs.CONFIG_KEY]  # a deploy with infra.logs.enabled=false
    vm.install_agent()

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert not vm.path(AGENT_CONFIG).exists()
    assert RESTART not in vm.calls("systemctl")
    assert "no spot-ops-agent-config in the metadata" in result.stderr
