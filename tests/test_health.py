"""`GET /healthz` for MIG autohealing, against a real training process and the real server."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness.health import Bounds, Health, serve
from tests import runs


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


@pytest.mark.parametrize("served_by", ["launcher", "trainer"])
def test_health_endpoint_reports_progress_and_a_stall(tmp_path, served_by):
    """As the VM runs it (the launcher serves, the trainer reports) and a bare trainer serving itself."""
    port, stall = runs.free_port(), tmp_path / "stall"
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=400", f"run.dir={run_dir}", "model._target_=tests.user_model.StallingBigram",
                 "health.enabled=true", f"health.port={port}", "health.stall_s=1"]
    cmd = runs.launcher_cmd(1, []) if served_by == "launcher" else runs.train_cmd(0, [])
    proc = subprocess.Popen(cmd + overrides, cwd=runs.REPO, env=runs.env(STALL_FILE=str(stall)),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code, body = runs.wait_for(lambda: (r := get_health(port))[1].get("phase") == "training" and r,
                                   interval=0.05, what="healthz in the training phase")
        assert code == 200
        stall.touch()
        code, body = runs.wait_for(lambda: (r := get_health(port))[0] == 503 and r, interval=0.1, what="a 503")
        assert body["phase"] == "training" and body["seconds_since_progress"] >= 1
        stall.unlink()
        runs.wait_for(lambda: get_health(port)[0] == 200, interval=0.05, what="recovery")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()


def test_each_phase_answers_200_within_its_own_bound_and_503_beyond_it():
    """Restoring and saving get their own (longer) bounds than a step; preempted and finished none."""
    health = Health(Bounds(stall_s=0.05, rendezvous_s=60, restore_s=0.4, save_s=0.4))
    server = serve(health, 0, host="127.0.0.1")
    port = server.server_address[1]
    try:
        for phase in ("starting", "restoring", "saving"):
            health.set_phase(phase)
            time.sleep(0.1)
            code, body = get_health(port)
            assert (code, body["phase"], body["bound_s"]) == (200, phase, 0.4), "past stall_s, within its bound"
            time.sleep(0.4)
            code, body = get_health(port)
            assert (code, body["phase"]) == (503, phase) and body["phase_s"] >= 0.4
        health.set_phase("finished")
        time.sleep(0.5)
        assert get_health(port)[0] == 200
        health.set_phase("training")
        time.sleep(0.1)
        assert get_health(port)[0] == 503
    finally:
        server.shutdown()


def test_the_launcher_answers_200_rendezvous_while_the_node_waits_for_its_peers(tmp_path):
    """What the VM's unit runs, waiting for a second node that is not there yet (a recreated peer): the
    endpoint answers for the whole wait, longer than three health periods (here stall_s), with 200."""
    port, log = runs.free_port(), tmp_path / "log.txt"
    overrides = [f"run.dir={tmp_path}/run", "launch.standalone=false", "launch.nnodes=2",
                 f"launch.rdzv_endpoint=127.0.0.1:{runs.free_port()}", "health.enabled=true", f"health.port={port}",
                 "health.stall_s=1", "health.rendezvous_s=6"]
    proc = subprocess.Popen([*runs.launcher_cmd(1, []), *overrides], cwd=runs.REPO, env=runs.env(),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        runs.wait_for(lambda: get_health(port)[0], interval=0.1, what="the launcher's endpoint")
        for _ in range(5):
            code, body = get_health(port)
            assert (code, body["phase"]) == (200, "rendezvous"), runs.tail(log)
            time.sleep(1.0)
        assert body["phase_s"] > 3 * 1, "three health periods (stall_s=1) have passed"
        code, body = runs.wait_for(lambda: (r := get_health(port))[0] == 503 and r, interval=0.2,
                                   what="a 503 once the wait outlives health.rendezvous_s")
        assert body["phase"] == "rendezvous" and body["phase_s"] >= 6, body
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
