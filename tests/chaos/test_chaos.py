"""The local Spot cloud: its pieces (schedule, metadata server, rendezvous store) and one short run of
the real thing, which must end exact with no lost step."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from harness import config
from harness.chaos.metadata import FakeMetadata
from harness.chaos.schedule import Preemption, build, explicit, exponential
from harness.checkpoint.gcs import GCSStore
from harness.checkpoint.manifest import Manifest, file_entry
from harness.launch import torchrun_command
from tests import runs
from tests.gcs_emulator import FakeGCS

# Two Spot workers x 1 process; seed 1728 at mtbi_s=50 preempts worker-1 6.0 s and worker-0 27.0 s after
# the first step, then nothing before 154 s. 500 steps take at least 25 s of paced steps plus a restart,
# so the second preemption always lands in training, and the job ends long before the third.
SHORT_RUN = ["chaos.mtbi_s=50", "chaos.seed=1728", "chaos.notice_s=6", "chaos.recreate_s=2",
             "chaos.max_duration_s=240", "train.max_steps=500"]


def test_schedule_is_seeded_per_vm_and_explicit_lists_override_it():
    a = exponential(2, 50, 300, seed=1728)
    assert a == exponential(2, 50, 300, seed=1728) != exponential(2, 50, 300, seed=1729)
    assert [(p.vm, round(p.at_s, 1)) for p in a[:3]] == [(1, 6.0), (0, 27.0), (0, 154.6)]
    assert all(p.at_s < 300 for p in a) and a == sorted(a)
    assert exponential(2, 50, 100, seed=1728) == [p for p in a if p.at_s < 100], "a slot's draws depend on the horizon"
    assert [p for p in exponential(3, 50, 300, seed=1728) if p.vm < 2] == a, "...or on the number of slots"
    assert explicit([{"vm": 1, "at_s": 9}, {"vm": 0, "at_s": 3}], 2) == [Preemption(3, 0), Preemption(9, 1)]
    with pytest.raises(ValueError, match="vm < 2"):
        explicit([{"vm": 2, "at_s": 1}], 2)


def test_schedule_from_config_prefers_the_explicit_list():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"topology": {"workers": 2}, "mtbi_s": 50, "seed": 1728, "max_duration_s": 300,
                            "preemptions": [{"vm": 0, "at_s": 5}]})
    assert build(cfg) == [Preemption(5, 0)]
    cfg.preemptions = None
    assert build(cfg) == exponential(2, 50, 300, 1728)


def get(host: str, path: str, flavor: bool = True, timeout: float = 5) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://{host}/computeMetadata/v1/{path}",
                                 headers={"Metadata-Flavor": "Google"} if flavor else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("ETag", "")
    except urllib.error.HTTPError as err:
        return err.code, "", ""


def test_metadata_server_answers_like_gce_and_wakes_long_polls():
    md = FakeMetadata({"spot-role": "worker"})
    try:
        assert get(md.host, "instance/attributes/spot-role")[:2] == (200, "worker")
        assert get(md.host, "instance/attributes/nope")[0] == 404
        assert get(md.host, "instance/preempted", flavor=False)[0] == 403
        _, value, etag = get(md.host, "instance/preempted")
        assert value == "FALSE"
        t0 = time.monotonic()
        md.attributes["spot-role"] = "coordinator"  # a plain write, as tests/startup do
        threading.Timer(0.3, md.preempt).start()
        _, value, _ = get(md.host, f"instance/preempted?wait_for_change=true&last_etag={etag}")
        assert value == "TRUE" and 0.2 < time.monotonic() - t0 < 1.5
        assert get(md.host, "instance/attributes/spot-role")[1] == "coordinator"
        md.mode = "error"
        assert get(md.host, "instance/preempted")[0] == 503
    finally:
        md.close()


def test_rendezvous_store_serves_clients_until_sigterm(tmp_path: Path):
    port = runs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.rendezvous", "--port", str(port)], cwd=runs.REPO,
                            env=runs.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        client.set("round", "1")
        assert TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10)).get("round") == b"1"
        second = subprocess.run([sys.executable, "-m", "harness.rendezvous", "--port", str(port)], cwd=runs.REPO,
                                env=runs.env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "cannot listen" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_short_chaos_run_is_exact_and_loses_no_step(tmp_path: Path):
    """Two Spot workers preempted twice (each VM once) with a notice longer than the emergency save:
    both recreated, the model equals the uninterrupted reference, and no step is computed twice."""
    out = tmp_path / "chaos"
    proc = subprocess.run([sys.executable, "-m", "harness.chaos", *SHORT_RUN, "chaos.name=short",
                           f"chaos.out_dir={out}"], cwd=runs.REPO, env=runs.env(), capture_output=True, text=True,
                          timeout=330)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "chaos_report.json").read_text())
    context = json.dumps({k: report[k] for k in ("events", "observer", "ledger", "goodput")}, indent=1)
    assert report["finished"] and report["final_step"] == 500, context
    assert report["preemptions"] >= 2 and report["recreates"] >= 1, context
    assert report["exact"] is True, context
    assert report["lost_steps"] == 0 and report["repeated_samples"] == 0, context
    # A preemption can land while the job is still restarting from the previous one: >= 1 restart.
    assert report["world_sizes"] == [2] and report["restarts"] >= 1, context
    assert 0 < report["goodput"]["goodput"] < 1
    # The ledger (what W&B and Monitoring see) and the local cloud's own observer tell the same story.
    assert abs(report["ledger"]["goodput"] - report["observer"]["goodput"]) < 0.05, context
    assert (out / "chaos_timeline.png").stat().st_size > 10_000
    assert str(out / "chaos_report.json") in proc.stdout


def test_a_multi_node_checkpoint_commits_in_the_bucket_once_every_node_share_is_there(tmp_path: Path,
                                                                                       fake_gcs: FakeGCS):
    """Each simulated VM's local SSD holds only its own ranks' files: each node uploads its share and the
    last one to finish commits (GCSStore.put_share), so a recreated VM restores from the bucket."""
    fake_gcs.make_bucket("share-test")
    store = GCSStore("gs://share-test/run", retry_deadline_s=3.0)
    full = tmp_path / "full"
    full.mkdir()
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (full / name).write_bytes(name.encode() * 100)
    manifest = Manifest(step=7, files={n.name: file_entry(n) for n in full.iterdir()}, attempt="abc-7")
    nodes = {0: (".metadata", "__0_0.distcp"), 1: ("__1_0.distcp",)}
    for node, names in nodes.items():
        (tmp_path / f"node{node}").mkdir()
        for name in names:
            shutil.copy(full / name, tmp_path / f"node{node}" / name)
    assert store.put_share(7, tmp_path / "node1", manifest) is False
    assert store.committed_steps() == []
    assert store.put_share(7, tmp_path / "node0", manifest) is True
    assert store.committed_steps() == [7] and store.verify(7).attempt == "abc-7"
    assert store.put_share(7, tmp_path / "node1", manifest) is True  # a repeated share is no conflict


def test_launch_passes_the_rendezvous_conf_and_the_trainer_module():
    cfg = config.load(["launch.standalone=false", "launch.nnodes=2:2", "launch.rdzv_conf='is_host=False'",
                       "launch.module=harness.chaos.baseline"])
    cmd = torchrun_command(cfg, [])
    assert "--rdzv-conf=is_host=False" in cmd and cmd[cmd.index("-m", 3) + 1] == "harness.chaos.baseline"
    assert "--rdzv-conf" not in " ".join(torchrun_command(config.load([]), []))
