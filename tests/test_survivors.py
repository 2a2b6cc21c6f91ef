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
from tests.preemption.test_preemption import CONFIG


class TwoNodes:
    """Two "VMs" on this machine, each with its own run dir (its own disks) and log, started as their
    units start them; `preempt` is systemd stopping the unit on the preempted one."""

    def __init__(self, tmp_path, common: list[str]):
        self.common = common
        self.dirs = {n: tmp_path / n for n in ("survivor", "preempted")}
        self.logs = {n: tmp_path / f"{n}.log" for n in self.dirs}
        self.started: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        proc = runs.start_launcher(1, [*self.common, f"run.dir={self.dirs[name]}"], self.logs[name])
        self.started.append(proc)
        return proc

    def preempt_after(self, step: int, preempted: subprocess.Popen) -> None:
        runs.wait_for(lambda: any(runs.logged_step(log, step) for log in self.logs.values()), timeout=180,
                      what=f"training past step {step} at two nodes")
        os.kill(preempted.pid, signal.SIGTERM)
        assert preempted.wait(timeout=60) == PREEMPTED_EXIT_CODE, runs.tail(self.logs["preempted"])

    def log(self, name: str) -> str:
        return self.logs[name].read_text()

    def kill(self) -> None:
        for proc in self.started:
            runs.kill_tree(proc.pid)


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
        nodes = TwoNodes(tmp_path, [*CONFIG, "run.name=two-nodes", "checkpoint.store=gs://two-nodes/job",
                                    "launch.standalone=false", "launch.nnodes=2",
                                    f"launch.rdzv_endpoint=127.0.0.1:{port}",
                                    *(["launch.rdzv_conf='is_host=False'"] if coordinator else [])])
        survivor, preempted = nodes.start("survivor"), nodes.start("preempted")
        try:
            nodes.preempt_after(25, preempted)
            marker = json.loads((nodes.dirs["preempted"] / "PREEMPTED").read_text())
            assert marker["ok"] is True and marker["tier"] == "gs" and marker["preempted_nodes"]
            runs.wait_for(lambda: "back to rendezvous" in nodes.log("survivor"), timeout=60,
                          what="the survivor going back to rendezvous")
            assert survivor.poll() is None, "the survivor stopped: " + nodes.log("survivor")[-3000:]
            assert not (nodes.dirs["survivor"] / "PREEMPTED").exists(), "a marker on a node that got no notice"
            assert nodes.start("preempted").wait(timeout=240) == 0, nodes.log("preempted")[-3000:]
            assert survivor.wait(timeout=60) == 0, nodes.log("survivor")[-3000:]
        finally:
            nodes.kill()
            if coordinator:
                runs.kill_tree(coordinator.pid)
    dirs = nodes.dirs
    for d in dirs.values():  # each node's local tier holds its share under a manifest of its own
        share = LocalStore(str(d / "staging"))
        for step in share.committed_steps():
            assert share.verify(step).meta["share_of_node"] in ("0", "1")
    (summary,) = [json.loads(p.read_text()) for d in dirs.values() if (p := d / "summary.json").exists()]
    assert summary["model_sha256"] == reference_sha(2, CONFIG)
    assert summary["restarts"] == 1 and summary["preemptions"] >= 1
