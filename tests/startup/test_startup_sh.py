"""startup/startup.sh against a fake metadata server, with stubbed disk, systemd, gcloud and python3."""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.startup.startup_vm import STUBS, Vm, parse_exec_start

PLAIN_OVERRIDES = ["train.max_steps=1000", "model.n_layer=12"]


def expected_argv(vm: Vm, role: str, python: str | None = None, nnodes: str = "1:4") -> list[str]:
    """The unit's command line; the master's persistent disk is a tier only in a one-node job (in a
    multi-node job a node's disk could hold only its own share of a checkpoint)."""
    run_dir = str(vm.path("/mnt/localssd/runs/run-42"))
    single = role == "master" and nnodes == "1"
    pd_tier = f"{{name:pd,url:'{vm.path('/mnt/pd/checkpoints/run-42')}'}}," if single else ""
    return [
        python or str(vm.path("/opt/spot/releases/v7/venv/bin/python")),
        "-m",
        "harness.launch",
        "run.name=run-42",
        f"run.dir={run_dir}",
        f"checkpoint.store={run_dir}/checkpoints",
        "checkpoint.ephemeral=true",
        f"checkpoint.slower_tiers=[{pd_tier}{{name:gcs,url:'gs://spot-bkt/runs/run-42/checkpoints'}}]",
        f"launch.nnodes={nnodes}",
        "launch.nproc_per_node=8",
        "launch.rdzv_endpoint=10.0.0.2:29400",
        "launch.standalone=false",
        "health.port=8888",
        *PLAIN_OVERRIDES,
    ]


@pytest.mark.parametrize("nnodes", ["1", "1:4"])
def test_the_master_disk_is_a_checkpoint_tier_only_in_a_one_node_job(vm: Vm, nnodes: str):
    vm.metadata.attributes.update({"spot-role": "master", "spot-nnodes": nnodes})
    vm.add_ssds(1)
    vm.has_filesystem(vm.pd_device)
    result = vm.startup()
    assert result.returncode == 0, result.stderr
    assert vm.exec_start() == expected_argv(vm, "master", nnodes=nnodes)


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
        f"Environment=SPOT_CONF_DIR={vm.path('/opt/spot/releases/v7/conf')}",
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
    assert vm.calls("python3") == [] and vm.pip_installs() == []
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
    for key in ("spot-nnodes", "spot-nproc-per-node"):  # the run id stays: it reopens that rendezvous
        del vm.metadata.attributes[key]
    vm.add_ssds(2)

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert vm.exec_start("spot-rendezvous.service") == [
        str(vm.path("/opt/spot/releases/v7/venv/bin/python")),
        "-m",
        "harness.rendezvous",
        "--port",
        "29400",
        "--run-id",
        "run-42",
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
    python = str(STUBS / "venv-python")  # runs the preflight

    result = vm.startup(SPOT_HARNESS_PYTHON=python)

    assert result.returncode == 0, result.stderr
    assert vm.exec_start() == expected_argv(vm, "master", python=python)
    assert [c for c in vm.calls("gcloud") if c[1] == "storage"] == []
    assert vm.calls("python3") == [] and vm.pip_installs() == []
    assert "SPOT_CONF_DIR" not in vm.unit()


def test_a_new_release_is_installed_from_its_wheelhouse_into_a_fresh_directory(vm: Vm):
    vm.add_ssds(1)
    assert vm.startup().returncode == 0
    vm.publish_release("v8")
    vm.metadata.attributes["spot-release"] = "v8"
    vm.clear_calls()

    assert vm.startup().returncode == 0

    new = vm.release_dir("v8")
    assert ["gcloud", "storage", "cp", "--recursive", "gs://spot-bkt/releases/v8/*", f"{new}/"] in vm.calls("gcloud")
    wheels = [c for c in vm.calls("gcloud") if c[-1] == f"{new}/wheels/"]
    assert len(wheels) == 1 and "gs://spot-bkt/wheels/pip-24.0-py3-none-any.whl" in wheels[0]
    assert vm.calls("python3")[-1] == ["python3", "-m", "venv", "--system-site-packages", "--without-pip",
                                       f"{new}/venv"]
    pip = vm.pip_installs()
    assert [c[1] for c in pip] == [f"{new}/wheels/pip-24.0-py3-none-any.whl/pip"] * 2
    assert all("--no-index" in c and f"{new}/wheels" in c for c in pip), "never a package index"
    assert pip[0][-2:] == ["-r", f"{new}/requirements.txt"]
    assert pip[1][-1] == f"{new}/spot_harness-0.1.0-py3-none-any.whl"
    assert (new / ".installed").is_file() and not vm.release_dir("v7").exists()
    assert vm.exec_start()[0] == f"{new}/venv/bin/python"
    assert f"Environment=SPOT_CONF_DIR={new}/conf" in vm.unit().splitlines()


def test_boot_waits_for_a_release_that_is_published_later(vm: Vm):
    vm.unpublish("v7")
    vm.add_ssds(1)
    proc = vm.startup_in_background()
    try:
        deadline = time.monotonic() + 30
        while len(manifest_polls(vm)) < 2:  # polled, found nothing, polled again
            assert time.monotonic() < deadline and proc.poll() is None, "startup.sh did not wait for the manifest"
            time.sleep(0.1)
        assert started(vm) == [] and vm.pip_installs() == []
        vm.publish_release("v7")
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "waiting for gs://spot-bkt/releases/v7/manifest.json (make deploy publishes it)" in stderr
    assert (vm.release_dir() / ".installed").is_file()
    assert started(vm) == [["systemctl", "start", "spot-train.service"]]


def manifest_polls(vm: Vm) -> list[list[str]]:
    return [c for c in vm.calls("gcloud") if c[2:4] == ["cp", "gs://spot-bkt/releases/v7/manifest.json"]]


def test_a_release_never_published_fails_naming_it(vm: Vm):
    vm.unpublish("v7")
    vm.add_ssds(1)

    result = vm.startup(SPOT_RELEASE_WAIT_S="2")

    assert result.returncode != 0
    assert "release v7 is not published: no gs://spot-bkt/releases/v7/manifest.json after 2s" in result.stderr
    assert started(vm) == [] and not (vm.release_dir() / ".installed").exists()


def test_a_partial_install_from_an_earlier_boot_is_never_used(vm: Vm):
    vm.add_ssds(1)
    stale = vm.release_dir() / "wheels" / "half-downloaded.whl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")  # an earlier boot died before .installed

    result = vm.startup()

    assert result.returncode == 0, result.stderr
    assert not stale.exists(), "the release is installed into a fresh directory"
    assert len(vm.pip_installs()) == 2 and (vm.release_dir() / ".installed").is_file()


def test_a_sha256_mismatch_installs_nothing_and_names_the_file(vm: Vm):
    vm.publish_release("v7", corrupt="wheels/numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl")
    vm.add_ssds(1)

    result = vm.startup()

    assert result.returncode != 0
    assert "release v7 failed its sha256 check, not installed" in result.stderr
    assert "wheels/numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl: FAILED" in result.stderr
    assert vm.pip_installs() == [] and not (vm.release_dir() / ".installed").exists()
    assert started(vm) == []

    vm.publish_release("v7")  # fixed: the next boot installs it
    assert vm.startup().returncode == 0
    assert (vm.release_dir() / ".installed").is_file()


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


# --- preflight --------------------------------------------------------------------------------------


def preflight_failure(vm: Vm, result: subprocess.CompletedProcess[str], reason: str) -> None:
    """One clear line on the console and in the log, no job started, the 503 unit started instead."""
    assert result.returncode == 1
    console = (vm.tmp / "console").read_text().splitlines()
    assert len(console) == 1 and console[0].startswith("spot-startup: preflight failed: ") and reason in console[0]
    logged = [line for line in result.stderr.splitlines() if "preflight failed" in line]
    assert len(logged) == 1 and logged[0].endswith(f"ERROR: {console[0].removeprefix('spot-startup: ')}")
    assert started(vm) == [["systemctl", "start", "spot-preflight.service"]]
    assert not vm.path("/etc/systemd/system/spot-train.service").exists()


def test_preflight_passes_with_the_gpus_of_the_machine_type(vm: Vm):
    vm.metadata.attributes["spot-gpu-count"] = "8"
    vm.add_ssds(1)
    result = vm.startup(STUB_GPUS="8")
    assert result.returncode == 0, result.stderr
    assert "preflight: Python" in result.stderr and "torch 2.13.0+stub, 8 GPU(s)" in result.stderr


def test_preflight_without_a_gpu_serves_503_and_starts_no_job(vm: Vm):
    vm.metadata.attributes["spot-gpu-count"] = "1"
    vm.metadata.attributes["spot-health-port"] = str(_free_port())
    vm.add_ssds(1)

    result = vm.startup(STUB_GPUS="0")

    preflight_failure(vm, result, "sees no CUDA device, the machine type has 1 GPU(s)")
    # The unit startup.sh started answers the health check with the reason.
    argv = vm.exec_start("spot-preflight.service")
    server = subprocess.Popen(argv, env=vm.base_env(), stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{vm.metadata.attributes['spot-health-port']}/healthz"
        body = _get_when_up(url, server)
        assert body == (503, "preflight failed: torch 2.13.0+stub sees no CUDA device, the machine type has 1 GPU(s)\n")
    finally:
        server.kill()
    unit = vm.unit("spot-preflight.service")
    assert "Restart=always" in unit.splitlines()
    # A second boot with the same fault does the same, once: no loop of restarts of the training unit.
    vm.clear_calls()
    assert vm.startup(STUB_GPUS="0").returncode == 1
    assert started(vm) == [["systemctl", "start", "spot-preflight.service"]]


def test_preflight_with_the_wrong_python_fails_naming_both(vm: Vm):
    vm.metadata.attributes["spot-python"] = "3.99"
    vm.add_ssds(1)
    result = vm.startup()
    preflight_failure(vm, result, "but the release is built for 3.99 (infra.image.python)")
    assert re.search(r"preflight failed: Python 3\.\d+ at /", (vm.tmp / "console").read_text())


def test_preflight_when_torch_cannot_be_imported(vm: Vm):
    vm.metadata.attributes["spot-role"] = "coordinator"
    for key in ("spot-nnodes", "spot-nproc-per-node"):
        del vm.metadata.attributes[key]
    result = vm.startup(STUB_NO_TORCH="1")
    assert result.returncode == 1
    assert "preflight failed: import torch failed: ImportError('libcudnn.so.9" in result.stderr
    assert started(vm) == [], "a coordinator has no HTTP health check: nothing to serve"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_when_up(url: str, server: subprocess.Popen) -> tuple[int, str]:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.stderr else ""
            time.sleep(0.1)
