"""Only the preempted node stops: a notice on one node of a multi-node job makes every rank save, the
noticed node's launcher returns 75 (its VM goes away), and every other node's launcher goes straight
back to rendezvous and waits there for the recreated peer. Real launchers and torchrun agents, two
"nodes" on this machine with their own run dirs (their own local disks) and one bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from harness.checkpoint.store import LocalStore
from harness.preemption import PREEMPTED_EXIT_CODE
from tests import runs
from tests.gcs_emulator import running_fake_gcs
from tests.test_preemption import CONFIG


@pytest.mark.parametrize("store_host", ["agent", "coordinator"])
def test_only_the_preempted_node_stops_and_the_survivor_rejoins_to_the_end(tmp_path, reference_sha, store_host):
    """store_host=agent: a training node's agent hosts the c10d store (the hybrid master); coordinator:
    `harness.rendezvous` does (all_spot), where the store outlives the round that a leaving agent
    closed, so it must reopen it for the survivor and the recreated node to meet again."""
    port = runs.free_port()
    coordinator = None
    if store_host == "coordinator":
        coordinator = subprocess.Popen([sys.executable, "-m", "harness.rendezvous", "--port", str(port),
                                        "--run-id", "two-nodes"], cwd=runs.REPO, env=runs.env(),
                                       stdout=open(tmp_path / "coordinator.log", "ab"), stderr=subprocess.STDOUT)
    with running_fake_gcs() as gcs:
        gcs.make_bucket("two-nodes")
        common = [*CONFIG, "run.name=two-nodes", "checkpoint.store=gs://two-nodes/job", "launch.standalone=false",
                  "launch.nnodes=2", f"launch.rdzv_endpoint=127.0.0.1:{port}",
                  *(["launch.rdzv_conf='is_host=False'"] if coordinator else [])]
        dirs = {n: tmp_path / n for n in ("survivor", "preempted")}
        logs = {n: tmp_path / f"{n}.log" for n in dirs}

        def node(name: str):
            return runs.start_launcher(1, [*common, f"run.dir={dirs[name]}"], logs[name])

        survivor, preempted = node("survivor"), node("preempted")
        started = [survivor, preempted]
        try:
            runs.wait_for(lambda: any(runs.logged_step(log, 25) for log in logs.values()), timeout=180,
                          what="training past a checkpoint")
            os.kill(preempted.pid, signal.SIGTERM)  # systemd stopping the unit on the preempted VM
            assert preempted.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(logs["preempted"])
            marker = json.loads((dirs["preempted"] / "PREEMPTED").read_text())
            assert marker["ok"] is True and marker["tier"] == "gs" and marker["preempted_nodes"]
            runs.wait_for(lambda: "back to rendezvous" in logs["survivor"].read_text(), timeout=60,
                          what="the survivor going back to rendezvous")
            assert survivor.poll() is None, "the survivor stopped: " + runs.tail(logs["survivor"])
            assert not (dirs["survivor"] / "PREEMPTED").exists(), "a marker on a node that got no notice"
            recreated = node("preempted")
            started.append(recreated)
            assert recreated.wait(timeout=240) == 0, runs.tail(logs["preempted"])
            assert survivor.wait(timeout=60) == 0, runs.tail(logs["survivor"])
        finally:
            for proc in [*started, *([coordinator] if coordinator else [])]:
                runs.kill_tree(proc.pid)
    for d in dirs.values():  # each node's local tier holds its share under a manifest of its own
        share = LocalStore(str(d / "staging"))
        for step in share.committed_steps():
            assert share.verify(step).meta["share_of_node"] in ("0", "1")
    (summary,) = [json.loads(p.read_text()) for d in dirs.values() if (p := d / "summary.json").exists()]
    assert summary["model_sha256"] == reference_sha(2, CONFIG)
    assert summary["restarts"] == 1 and summary["preemptions"] >= 1


def test_shrink_trains_on_while_the_preempted_node_is_down_and_grows_back(tmp_path):
    """elastic.on_preemption=shrink: the survivor trains alone while its peer is down, and torchrun
    grows the job again when the recreated node joins; every sample is consumed exactly once."""
    config = ["train.max_steps=600", "checkpoint.interval_steps=20", "train.audit_samples=true",
              "elastic.on_preemption=shrink", "launch.nnodes=1:2", "launch.rdzv_conf='last_call_timeout=2'"]
    dirs = {n: tmp_path / n for n in ("survivor", "preempted")}
    logs = {n: tmp_path / f"{n}.log" for n in dirs}
    with running_fake_gcs() as gcs:
        gcs.make_bucket("shrink")
        common = [*config, "run.name=shrink", "checkpoint.store=gs://shrink/job", "launch.standalone=false",
                  f"launch.rdzv_endpoint=127.0.0.1:{runs.free_port()}"]

        def node(name: str):
            return runs.start_launcher(1, [*common, f"run.dir={dirs[name]}"], logs[name])

        survivor, preempted = node("survivor"), node("preempted")
        started = [survivor, preempted]
        try:
            runs.wait_for(lambda: any(runs.logged_step(log, 40) for log in logs.values()), timeout=180,
                          what="training at two nodes")
            os.kill(preempted.pid, signal.SIGTERM)
            assert preempted.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(logs["preempted"])
            runs.wait_for(lambda: "at world size 1" in logs["survivor"].read_text(), timeout=120,
                          what="the survivor training alone")
            assert survivor.poll() is None
            recreated = node("preempted")
            started.append(recreated)
            assert survivor.wait(timeout=240) == 0, runs.tail(logs["survivor"])
            assert recreated.wait(timeout=60) == 0, runs.tail(logs["preempted"])
        finally:
            for proc in started:
                runs.kill_tree(proc.pid)
    (summary,) = [json.loads(p.read_text()) for d in dirs.values() if (p := d / "summary.json").exists()]
    assert summary["final_step"] == 600 and {1, 2} <= set(summary["world_sizes"]), summary["world_sizes"]
    consumed = []
    for record in [*dirs["survivor"].glob("samples/*.txt"), *dirs["preempted"].glob("samples/*.txt")]:
        for line in record.read_text().splitlines():
            _step, first, stop = map(int, line.split())
            consumed.extend(range(first, stop))
    assert sorted(consumed) == list(range(summary["sample_index"])), "a sample was repeated or skipped"
