"""startup/startup.sh against a fake metadata server, with stubbed disk, systemd, gcloud and python3."""

from __future__ import annotations

import stat
import urllib.error
import urllib.request

import pytest

from tests.startup.startup_vm import Vm, parse_exec_start

PLAIN_OVERRIDES = ["train.max_steps=1000", "model.n_layer=12"]


def expected_argv(vm: Vm, role: str, python: str | None = None) -> list[str]:
    run_dir = str(vm.path("/mnt/localssd/runs/run-42"))
    pd_tier = f"{{name:pd,url:'{vm.path('/mnt/pd/checkpoints/run-42')}'}}," if role == "master" else ""
    return [
        python or str(vm.path("/opt/spot/venv/bin/python")),
        "-m",
        "harness.launch",
        "run.name=run-42",
        f"run.dir={run_dir}",
        f"checkpoint.store={run_dir}/checkpoints",
        "checkpoint.ephemeral=true",
        f"checkpoint.slower_tiers=[{pd_tier}{{name:gcs,url:'gs://spot-bkt/runs/run-42/checkpoints'}}]",
        "launch.nnodes=1:4",
        "launch.nproc_per_node=8",
        "launch.rdzv_endpoint=10.0.0.2:29400",
        "launch.standalone=false",
        "health.port=8888",
        *PLAIN_OVERRIDES,
    ]


def started(vm: Vm) -> list[list[str]]:
    return [c for c in vm.calls("systemctl") if c[1] == "start"]


@pytest.mark.parametrize("ssds", [1, 2])
@pytest.mark.parametrize("role", ["master", "worker"])
def test_first_boot_prepares_disks_writes_unit_and_starts_it(vm: Vm, role: str, ssds: int):
    vm.metadata.attributes["spot-role"] = role
    devices = vm.add_ssds(ssds)
    vm.has_filesystem(vm.pd_device)

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    if ssds == 1:
        assert vm.calls("mdadm") == []
        data_device = devices[0]
    else:
        creates = [c for c in vm.calls("mdadm") if "--create" in c]
        assert creates == [
            ["mdadm", "--create", "/dev/md0", "--level=0", "--raid-devices=2", "--run", *devices]
        ]
        data_device = "/dev/md0"
    # The blank local SSD is formatted; the persistent disk has a filesystem and never is.
    assert [c[-1] for c in vm.calls("mkfs.ext4")] == [data_device]
    mounts = [c[-2:] for c in vm.calls("mount")]
    expected_mounts = [[data_device, str(vm.path("/mnt/localssd"))]]
    if role == "master":
        expected_mounts.append([str(vm.pd_device), str(vm.path("/mnt/pd"))])
    assert mounts == expected_mounts

    unit = vm.unit()
    assert vm.exec_start() == expected_argv(vm, role)
    for line in [
        "Restart=on-failure",
        "SuccessExitStatus=75",
        "RestartPreventExitStatus=75",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=28",
        f"EnvironmentFile={vm.path('/etc/spot/spot-train.env')}",
        f"WorkingDirectory={vm.path('/opt/spot')}",
        f"Environment=SPOT_CONF_DIR={vm.path('/opt/spot/conf')}",
    ]:
        assert line in unit.splitlines(), line
    assert not vm.path("/etc/systemd/system/spot-rendezvous.service").exists()
    assert vm.calls("systemctl") == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "start", "spot-train.service"],
    ]


def test_env_file_is_root_only_and_holds_the_key_without_echoing_it(vm: Vm):
    vm.add_ssds(1)
    result = vm.startup(STUB_SECRET_VALUE="s3cr3t-api-key-0123")

    assert result.returncode == 0, result.stderr
    env_file = vm.path("/etc/spot/spot-train.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700
    assert "WANDB_API_KEY=s3cr3t-api-key-0123" in env_file.read_text().splitlines()
    assert ["gcloud", "secrets", "versions", "access", "latest", "--secret=wandb-key"] in vm.calls("gcloud")
    assert "s3cr3t" not in result.stderr + result.stdout


def test_without_a_wandb_secret_the_env_file_holds_no_key(vm: Vm):
    del vm.metadata.attributes["spot-wandb-secret"]
    vm.add_ssds(1)
    result = vm.startup()

    assert result.returncode == 0, result.stderr
    env_file = vm.path("/etc/spot/spot-train.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "WANDB_API_KEY" not in env_file.read_text()
    assert [c for c in vm.calls("gcloud") if c[1] == "secrets"] == []


def test_a_secret_that_is_not_a_key_stops_the_script_without_showing_it(vm: Vm):
    vm.add_ssds(1)
    result = vm.startup(STUB_SECRET_VALUE="not a key; rm -rf")

    assert result.returncode != 0
    assert "wandb-key" in result.stderr
    assert "rm -rf" not in result.stderr
    assert started(vm) == []


@pytest.mark.parametrize("ssds", [1, 2])
@pytest.mark.parametrize("role", ["master", "worker"])
def test_second_run_changes_nothing(vm: Vm, role: str, ssds: int):
    vm.metadata.attributes["spot-role"] = role
    vm.add_ssds(ssds)
    assert vm.startup().returncode == 0
    unit_before = vm.unit()
    vm.clear_calls()

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert vm.calls("mkfs.ext4") == []
    assert vm.calls("mdadm") == []
    assert vm.calls("mount") == []
    assert vm.calls("python3") == [] and vm.calls("venv-python") == []
    assert [c for c in vm.calls("gcloud") if c[1] == "storage"] == []
    assert vm.unit() == unit_before
    # No daemon-reload for an unchanged unit; starting a running unit is a no-op.
    assert vm.calls("systemctl") == [["systemctl", "start", "spot-train.service"]]


def test_after_a_reboot_the_array_is_reassembled_and_mounted_not_recreated(vm: Vm):
    devices = vm.add_ssds(2)
    vm.has_filesystem(vm.pd_device)
    assert vm.startup().returncode == 0
    vm.reboot()
    vm.clear_calls()

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert [c for c in vm.calls("mdadm") if c[1] not in ("--detail", "--stop")] == [
        ["mdadm", "--assemble", "/dev/md0", *devices]
    ]
    assert vm.calls("mkfs.ext4") == []
    assert [c[-2:] for c in vm.calls("mount")] == [
        ["/dev/md0", str(vm.path("/mnt/localssd"))],
        [str(vm.pd_device), str(vm.path("/mnt/pd"))],
    ]


def test_a_blank_persistent_disk_is_formatted_once(vm: Vm):
    vm.add_ssds(1)
    assert vm.startup().returncode == 0
    assert str(vm.pd_device) in [c[-1] for c in vm.calls("mkfs.ext4")]
    vm.reboot()
    vm.clear_calls()

    assert vm.startup().returncode == 0
    assert vm.calls("mkfs.ext4") == []


@pytest.mark.parametrize("rc", [1, 4, 8])
def test_a_persistent_disk_blkid_cannot_read_is_never_formatted(vm: Vm, rc: int):
    vm.add_ssds(1)
    vm.blkid_answers(vm.pd_device, rc)

    result = vm.startup()

    assert result.returncode != 0
    assert str(vm.pd_device) in result.stderr and "refusing to format" in result.stderr
    assert str(vm.pd_device) not in [c[-1] for c in vm.calls("mkfs.ext4")]
    assert started(vm) == []


def test_a_missing_persistent_disk_fails_clearly(vm: Vm):
    vm.add_ssds(1)
    vm.pd_device.unlink()

    result = vm.startup(SPOT_DEVICE_WAIT_S="0")

    assert result.returncode != 0
    assert f"device {vm.pd_device} did not appear" in result.stderr
    assert started(vm) == []


def test_without_local_ssds_the_run_stays_on_the_boot_disk(vm: Vm):
    vm.metadata.attributes["spot-role"] = "worker"
    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert "no local SSD" in result.stderr
    assert vm.calls("mdadm") == [] and vm.calls("mkfs.ext4") == [] and vm.calls("mount") == []
    assert vm.path("/mnt/localssd").is_dir()
    assert vm.exec_start() == expected_argv(vm, "worker")


def test_coordinator_runs_only_the_rendezvous_store(vm: Vm):
    vm.metadata.attributes["spot-role"] = "coordinator"
    for key in ("spot-run-id", "spot-nnodes", "spot-nproc-per-node"):
        del vm.metadata.attributes[key]
    vm.add_ssds(2)

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert vm.exec_start("spot-rendezvous.service") == [
        str(vm.path("/opt/spot/venv/bin/python")),
        "-m",
        "harness.rendezvous",
        "--port",
        "29400",
    ]
    assert not vm.path("/etc/systemd/system/spot-train.service").exists()
    assert vm.calls("mdadm") == [] and vm.calls("mkfs.ext4") == [] and vm.calls("mount") == []
    assert [c for c in vm.calls("gcloud") if c[1] == "secrets"] == []
    assert vm.calls("systemctl") == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "start", "spot-rendezvous.service"],
    ]
    vm.clear_calls()
    assert vm.startup().returncode == 0
    assert vm.calls("systemctl") == [["systemctl", "start", "spot-rendezvous.service"]]


@pytest.mark.parametrize(
    "key",
    [
        "spot-role",
        "spot-bucket",
        "spot-release",
        "spot-run-id",
        "spot-rdzv-endpoint",
        "spot-nnodes",
        "spot-nproc-per-node",
    ],
)
def test_a_missing_required_key_fails_naming_it_before_touching_anything(vm: Vm, key: str):
    vm.add_ssds(2)
    del vm.metadata.attributes[key]

    result = vm.startup()

    assert result.returncode != 0
    assert f"required metadata key {key} is missing" in result.stderr
    assert vm.calls("mdadm") == [] and vm.calls("mkfs.ext4") == [] and vm.calls("systemctl") == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spot-role", "boss"),
        ("spot-rdzv-endpoint", "10.0.0.2"),
        ("spot-nnodes", "four"),
        ("spot-run-id", "../etc"),
        ("spot-local-ssd-mount", "relative/path"),
    ],
)
def test_an_invalid_value_fails_naming_the_key(vm: Vm, key: str, value: str):
    vm.metadata.attributes[key] = value
    result = vm.startup()
    assert result.returncode != 0
    assert f"metadata key {key}='{value}' is not valid" in result.stderr


def test_harness_python_skips_the_install(vm: Vm):
    del vm.metadata.attributes["spot-release"]
    vm.add_ssds(1)

    result = vm.startup(SPOT_HARNESS_PYTHON="/usr/bin/python3.99")

    assert result.returncode == 0, result.stderr
    assert vm.exec_start() == expected_argv(vm, "master", python="/usr/bin/python3.99")
    assert [c for c in vm.calls("gcloud") if c[1] == "storage"] == []
    assert vm.calls("python3") == [] and vm.calls("venv-python") == []
    assert "SPOT_CONF_DIR" not in vm.unit()


def test_a_new_release_is_installed_and_its_conf_linked(vm: Vm):
    vm.add_ssds(1)
    assert vm.startup().returncode == 0
    vm.metadata.attributes["spot-release"] = "v8"
    vm.clear_calls()

    assert vm.startup().returncode == 0

    copy = ["gcloud", "storage", "cp", "--recursive", "gs://spot-bkt/releases/v8/*"]
    assert copy + [f"{vm.path('/opt/spot/releases/v8')}/"] in vm.calls("gcloud")
    pip = vm.calls("venv-python")
    assert len(pip) == 1 and pip[0][-1].endswith("releases/v8/spot_harness-0.1.0-py3-none-any.whl")
    assert vm.calls("python3") == []  # the venv is kept
    assert vm.path("/opt/spot/conf").resolve() == vm.path("/opt/spot/releases/v8/conf")


def test_overrides_with_shell_and_systemd_characters_survive_the_unit_file(vm: Vm):
    tricky = [
        "+tags=[a,b]",
        "wandb.project=goodput%20",
        "data.path=${oc.env:HOME}/tokens",
        "model.note='it_is'",
        'model.quote="q"',
        "model.backslash=a\\b",
    ]
    vm.metadata.attributes["spot-hydra-overrides"] = "  ".join(tricky) + "\n"
    vm.add_ssds(1)

    assert vm.startup().returncode == 0

    assert vm.exec_start()[-len(tricky) :] == tricky
    exec_line = next(line for line in vm.unit().splitlines() if line.startswith("ExecStart="))
    assert "%%20" in exec_line and "$${oc.env:HOME}" in exec_line


def test_marker_path_is_recorded_for_shutdown(vm: Vm):
    vm.add_ssds(1)
    assert vm.startup().returncode == 0
    recorded = vm.path("/etc/spot/marker-path").read_text().strip()
    assert recorded == str(vm.path("/mnt/localssd/runs/run-42/PREEMPTED"))

    vm.metadata.attributes["spot-hydra-overrides"] = "run.dir=/data/elsewhere"
    assert vm.startup().returncode == 0
    assert vm.path("/etc/spot/marker-path").read_text().strip() == "/data/elsewhere/PREEMPTED"


def test_parse_exec_start_undoes_systemd_escapes():
    assert parse_exec_start('/py -m x "a b" c=$${X} "d=%%h \\"q\\""') == [
        "/py",
        "-m",
        "x",
        "a b",
        "c=${X}",
        'd=%h "q"',
    ]


def test_fake_metadata_server_requires_the_flavor_header(vm: Vm):
    url = f"http://{vm.metadata.host}/computeMetadata/v1/instance/attributes/spot-role"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=5)
    assert err.value.code == 403
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.read() == b"master"


def test_every_metadata_request_of_startup_carries_the_header(vm: Vm):
    # The fake answers 403 without the header, and the script dies on a 403: a clean run proves it.
    vm.add_ssds(1)
    assert vm.startup().returncode == 0
    assert any(p.endswith("/spot-role") for p in vm.metadata.requests)
