"""startup/shutdown.sh: signal the trainer, wait for its PREEMPTED marker, never past the deadline."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.startup.startup_vm import SHUTDOWN_SH, STARTUP_SH, Vm

KILL = ["systemctl", "kill", "--signal=SIGTERM", "spot-train.service"]


def write_marker_later(path: Path, delay_s: float) -> threading.Timer:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".PREEMPTED.tmp")
        tmp.write_text("step=120\n")
        os.replace(tmp, path)

    timer = threading.Timer(delay_s, write)
    timer.start()
    return timer


def shutdown(vm: Vm, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = vm.run(SHUTDOWN_SH, **env)
    return result, time.monotonic() - start


def test_returns_as_soon_as_the_marker_appears(vm: Vm, tmp_path: Path):
    vm.metadata.preempted = "TRUE"
    marker = tmp_path / "run" / "PREEMPTED"
    timer = write_marker_later(marker, 0.5)

    result, elapsed = shutdown(vm, SPOT_MARKER=str(marker), SPOT_SHUTDOWN_DEADLINE_S="20")
    timer.join()

    assert result.returncode == 0, result.stderr
    assert 0.4 < elapsed < 5.0, elapsed
    assert KILL in vm.calls("systemctl")
    assert "preemption: sent SIGTERM" in result.stderr
    assert "marker appeared" in result.stderr


def test_returns_at_the_deadline_when_the_marker_never_appears(vm: Vm, tmp_path: Path):
    result, elapsed = shutdown(vm, SPOT_MARKER=str(tmp_path / "PREEMPTED"), SPOT_SHUTDOWN_DEADLINE_S="1.5")

    assert result.returncode == 0, result.stderr
    assert 1.4 < elapsed < 5.0, elapsed
    assert KILL in vm.calls("systemctl")
    assert "ordinary shutdown: sent SIGTERM" in result.stderr
    assert "marker did not appear within 1.5s" in result.stderr


def test_a_marker_left_from_an_earlier_preemption_does_not_count(vm: Vm, tmp_path: Path):
    marker = tmp_path / "PREEMPTED"
    marker.write_text("step=60\n")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    timer = write_marker_later(marker, 0.5)

    result, elapsed = shutdown(vm, SPOT_MARKER=str(marker), SPOT_SHUTDOWN_DEADLINE_S="20")
    timer.join()

    assert result.returncode == 0, result.stderr
    assert 0.4 < elapsed < 5.0, elapsed
    assert "marker appeared" in result.stderr


@pytest.mark.parametrize("rc", ["3", "4"])
def test_nothing_to_wait_for_when_the_trainer_is_not_running(vm: Vm, tmp_path: Path, rc: str):
    result, elapsed = shutdown(
        vm,
        SPOT_MARKER=str(tmp_path / "PREEMPTED"),
        SPOT_SHUTDOWN_DEADLINE_S="20",
        STUB_SYSTEMCTL_ACTIVE_RC=rc,
    )

    assert result.returncode == 0, result.stderr
    assert elapsed < 5.0
    assert KILL not in vm.calls("systemctl")
    assert "not running" in result.stderr


def test_nothing_to_wait_for_without_a_training_job(vm: Vm):
    # A coordinator, or a VM whose startup never got as far as the unit: no recorded marker path.
    result, elapsed = shutdown(vm, SPOT_SHUTDOWN_DEADLINE_S="20")

    assert result.returncode == 0, result.stderr
    assert elapsed < 5.0
    assert vm.calls("systemctl") == []


def test_waits_for_the_marker_startup_recorded(vm: Vm):
    vm.add_ssds(1)
    assert vm.run(STARTUP_SH).returncode == 0
    marker = vm.path("/mnt/localssd/runs/run-42/PREEMPTED")
    timer = write_marker_later(marker, 0.5)

    result, elapsed = shutdown(vm, SPOT_SHUTDOWN_DEADLINE_S="20")
    timer.join()

    assert result.returncode == 0, result.stderr
    assert 0.4 < elapsed < 5.0, elapsed
    assert str(marker) in result.stderr


def test_an_unreachable_metadata_server_does_not_stop_the_wait(vm: Vm, tmp_path: Path):
    marker = tmp_path / "PREEMPTED"
    timer = write_marker_later(marker, 0.3)

    result, elapsed = shutdown(
        vm, SPOT_MARKER=str(marker), SPOT_SHUTDOWN_DEADLINE_S="20", GCE_METADATA_HOST="127.0.0.1:9"
    )
    timer.join()

    assert result.returncode == 0, result.stderr
    assert elapsed < 5.0
    assert KILL in vm.calls("systemctl")
    assert "marker appeared" in result.stderr


def test_a_marker_the_trainer_wrote_just_before_the_script_started_counts(vm: Vm, tmp_path: Path):
    # The trainer's metadata watcher can see `preempted` and save before this script gets going.
    marker = tmp_path / "PREEMPTED"
    marker.write_text("step=60\n")

    result, elapsed = shutdown(vm, SPOT_MARKER=str(marker), SPOT_SHUTDOWN_DEADLINE_S="20")

    assert result.returncode == 0, result.stderr
    assert elapsed < 5.0, elapsed
    assert "marker appeared" in result.stderr


def test_returns_when_the_trainer_exits_without_a_marker(vm: Vm, tmp_path: Path):
    # A node without global rank 0 (which writes the marker), or a trainer that died: nothing left to wait for.
    stubs, stopped = tmp_path / "stubs", tmp_path / "stopped"
    stubs.mkdir()
    (stubs / "systemctl").write_text(f'#!/usr/bin/env bash\n[[ $1 == is-active && -e {stopped} ]] && exit 3\nexit 0\n')
    (stubs / "systemctl").chmod(0o755)
    timer = threading.Timer(0.5, stopped.touch)
    timer.start()

    result, elapsed = shutdown(vm, SPOT_MARKER=str(tmp_path / "PREEMPTED"), SPOT_SHUTDOWN_DEADLINE_S="20",
                               PATH=f"{stubs}:{vm.base_env()['PATH']}")
    timer.join()

    assert result.returncode == 0, result.stderr
    assert 0.4 < elapsed < 5.0, elapsed
    assert "exited after" in result.stderr and "without a marker" in result.stderr
