"""The local Spot cloud: its pieces (schedule, metadata server, rendezvous store), the deployment it
builds its VMs from, and short runs of the real thing on both topologies, which must end exact with no
lost step."""

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
from harness.chaos.__main__ import compose, load_chaos
from harness.chaos.cloud import RELEASE, vm_specs
from harness.chaos.differences import CATEGORIES, JOB, METADATA, differences
from harness.chaos.fake_metadata import FakeMetadata
from harness.chaos.schedule import Preemption, build, explicit, exponential
from harness.checkpoint.gcs_store import GCSStore
from harness.checkpoint.manifest import Manifest, file_entry
from harness.launch import torchrun_command
from infra import vm as infra_vm
from tests import runs
from tests.gcs_emulator import FakeGCS

# Two Spot workers x 1 process (harness/chaos/conf/chaos.yaml's job); seed 1728 at mtbi_s=50 preempts worker-1
# 6.0 s and worker-0 27.0 s after the first step, then nothing before 154 s. 500 steps take at least 25 s
# of paced steps plus a restart, so the second preemption always lands in training, and the job ends long
# before the third.
SHORT_RUN = ["chaos.mtbi_s=50", "chaos.seed=1728", "chaos.notice_s=6", "chaos.recreate_s=2",
             "chaos.max_duration_s=240", "train.max_steps=500"]
# What the local cloud may never change: what the job launches, restarts, reports health and saves by.
UNTOUCHABLE = ("launch", "health", "checkpoint", "elastic")


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
    cfg = load_chaos(["chaos.mtbi_s=50", "chaos.seed=1728", "chaos.max_duration_s=300",
                      "chaos.preemptions=[{vm:0,at_s:5}]"])
    assert build(cfg, 2) == [Preemption(5, 0)]
    cfg.preemptions = None
    assert build(cfg, 2) == exponential(2, 50, 300, 1728)
    assert build(cfg, 0) == [], "a topology without Spot VMs is never preempted"


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


@pytest.mark.parametrize("topology", ["hybrid", "all_spot"])
def test_each_vm_gets_the_deployments_metadata_changed_only_as_listed(topology: str, tmp_path: Path):
    """The local cloud's VMs are the deployment's groups with infra/vm.py's metadata; every attribute
    that differs is in the one list, and no launch, restart, health or checkpoint setting does."""
    job, cfg, settings = compose([f"topology={topology}"])
    found = differences(cfg, settings, monitoring_endpoint="127.0.0.1:4001")
    listed = {d.key for d in found}
    assert not [d.key for d in found if d.kind == JOB and d.key.split(".")[0] in UNTOUCHABLE]
    assert {d.category for d in found} <= set(CATEGORIES), "only time compression, addresses and stubs"
    specs = vm_specs(settings, found, "127.0.0.1:4000", tmp_path)
    master, workers = infra_vm.groups(settings)
    assert [(s.name, s.role, s.spot) for s in specs] == [
        (master.role, master.role, False), ("worker-0", "worker", True), ("worker-1", "worker", True)]
    scripts = infra_vm.startup_scripts(settings)
    for spec, group in zip(specs, [master, workers, workers], strict=True):
        deployed = {**scripts, **infra_vm.attributes(settings, group, rdzv_endpoint="127.0.0.1:4000",
                                                     bucket=settings.infra.bucket.name, release=RELEASE)}
        assert spec.attributes.keys() == deployed.keys()
        changed = {k for k in deployed if spec.attributes[k] != deployed[k]}
        assert changed <= listed | {"spot-hydra-overrides", "spot-pd-device"}, spec.name
        assert {d.key: d.local for d in found if d.kind == METADATA}.items() <= spec.attributes.items()
        if group.role == "coordinator":
            continue
        local, deploy = spec.attributes["spot-hydra-overrides"].split(), deployed["spot-hydra-overrides"].split()
        assert local[:len(deploy)] == deploy and {o.split("=")[0] for o in local[len(deploy):]} <= listed
        ours, theirs = config.load(local), config.load(deploy)
        for section in UNTOUCHABLE:
            assert ours[section] == theirs[section], f"{spec.name}: {section} differs from the deployment"
        assert ours.launch.rdzv_conf == ("is_host=true" if group.role == "master" else "is_host=false")
    if topology == "hybrid":
        assert specs[0].attributes["spot-pd-device"].startswith(str(tmp_path / "master" / "dev"))
        assert "google-checkpoint-pd" in specs[0].disks


def run_chaos(out: Path, *overrides: str) -> tuple[dict, str]:
    """`make chaos` with these overrides, into `out`; its report and (for failures) a context string."""
    proc = subprocess.run([sys.executable, "-m", "harness.chaos", *SHORT_RUN, *overrides, f"chaos.out_dir={out}"],
                          cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert str(out / "chaos_report.json") in proc.stdout
    report = json.loads((out / "chaos_report.json").read_text())
    return report, json.dumps({k: report[k] for k in ("events", "vms", "observer", "ledger")}, indent=1)


def assert_finished_and_rejoined(report: dict, context: str, world_size: int) -> dict[str, dict]:
    """Finished at the full size, no step lost or repeated, every recreated worker back in (the world
    size never changed, so the job could not train without it)."""
    assert report["finished"] and report["final_step"] == 500, context
    assert report["lost_steps"] == 0 and report["repeated_samples"] == report["skipped_samples"] == 0, context
    # A preemption can land while the job is still restarting from the previous one: >= 1 restart.
    assert report["world_sizes"] == [world_size] and report["restarts"] >= 1, context
    vms = {vm["name"]: vm for vm in report["vms"]}
    workers = [vm for vm in vms.values() if vm["role"] == "worker"]
    assert all(vm["provisioning"] == "SPOT" for vm in workers), context
    assert sum(vm["preemptions"] for vm in workers) >= 2 and all(vm["boots"] >= 2 for vm in workers), context
    assert all(vm["unit_exits"][-1:] == [0] for vm in workers), context  # each trained to the end
    assert [d["key"] for d in report["differences_from_deploy"]] and report["topology"]["world_size"] == world_size
    assert {d["category"] for d in report["differences_from_deploy"]} <= set(CATEGORIES), context
    # The job's end resized every instance group to 0 through the (local) Compute API; the job's metrics
    # reached the (local) Cloud Monitoring server; no healthy VM was recreated by autohealing.
    assert [g["final_size"] for g in report["groups"]] == [0] * len(report["groups"]), context
    assert report["monitoring_series"] > 0 and report["autoheals"] == 0, context
    # The ledger (what W&B and Monitoring see) and the local cloud's own observer tell the same story.
    # The observer's span starts at the first VM boot, the ledger's at the first trainer's start: in a
    # two-minute run the ~20 s of boot before any trainer is a visible share (measured: 0.450 vs 0.506).
    assert abs(report["ledger"]["goodput"] - report["observer"]["goodput"]) < 0.08, context
    return vms


@pytest.mark.slow
def test_short_chaos_run_is_exact_and_loses_no_step(tmp_path: Path):
    """`make chaos ARGS="topology=hybrid"`, shortened: the on-demand master trains and hosts the
    store, the two Spot workers are preempted (each once) with a notice longer than the emergency save
    and recreated; the master never stops (one boot, no 75 from its unit), the recreated workers
    rejoin, the model equals the uninterrupted reference, and no step is computed twice."""
    out = tmp_path / "chaos"
    report, context = run_chaos(out, "topology=hybrid", "chaos.name=hybrid", "chaos.boot_after_end=true")
    assert report["topology"]["name"] == "hybrid"
    vms = assert_finished_and_rejoined(report, context, world_size=3)
    # A Spot VM booted after the end (a recreate racing the resize) finds the finished record: no step.
    # Otherwise nothing boots after the end: the groups are at 0, and their VMs are deleted, not recreated.
    late = report["after_end"]
    assert late["steps_trained"] == 0 and late["unit_exits"] == [0], context
    end = next(e["t_s"] for e in report["events"] if e["kind"] == "finished")
    boots_after = [(e["vm"], e["detail"]) for e in report["events"] if e["kind"] in ("boot", "recreate")
                   and e["t_s"] > end]
    assert boots_after == [(late["vm"], f"boot {late['boot']}")], context
    assert {e["vm"] for e in report["events"] if e["kind"] == "deleted"} == set(vms), context
    master = vms["master"]
    assert (master["role"], master["provisioning"], master["boots"]) == ("master", "STANDARD", 1), context
    assert master["preemptions"] == 0 and 75 not in master["unit_exits"], context
    assert 0 < report["goodput"]["goodput"] < 1
    assert (out / "chaos_timeline.png").stat().st_size > 10_000
    assert report["exact"] is True, context


@pytest.mark.slow
def test_all_spot_fsdp_run_survives_a_dense_schedule_and_a_preemption_of_the_node_holding_rank_0(tmp_path: Path):
    """`make chaos ARGS="topology=all_spot train.parallelism=fsdp"` on the short dense case: worker-0
    (global rank 0 from the first round) and worker-1 are preempted 1.5 s apart, then worker-0 again
    while it waits in the rendezvous after its recreate (the schedule that once closed the rendezvous
    for good); both come back, the sharded job ends exact, and the coordinator never restarts."""
    out = tmp_path / "chaos"
    report, context = run_chaos(out, "topology=all_spot", "chaos.name=all-spot", "train.parallelism=fsdp",
                                "chaos.preemptions=[{vm:0,at_s:6},{vm:1,at_s:7.5},{vm:0,at_s:8,phase:rendezvous}]")
    assert report["topology"]["name"] == "all_spot"
    preempts = [e for e in report["events"] if e["kind"] == "preempt"]
    assert len(preempts) == 3 and preempts[1]["t_s"] - preempts[0]["t_s"] < 2.0, context
    assert preempts[2]["vm"] == "worker-0" and preempts[2]["detail"].endswith("during rendezvous"), context
    vms = assert_finished_and_rejoined(report, context, world_size=2)
    assert report["exact"] is True, context
    assert sum(vm["rank0_preemptions"] for vm in vms.values()) >= 1, context
    coordinator = vms["coordinator"]
    assert (coordinator["provisioning"], coordinator["boots"], coordinator["unit_exits"]) == ("STANDARD", 1, []), \
        context


@pytest.mark.slow
def test_shrink_trains_on_with_the_survivors_while_a_worker_is_down(tmp_path: Path):
    """`make chaos ARGS="elastic.on_preemption=shrink topology.workers.min=1"`: after each worker's
    preemption the master and the other worker train on at world size 2, and the job grows back to 3
    when the MIG has recreated the VM; every sample index is trained once, no step is lost. The recreate
    (minutes on GCP) takes 15 s here: longer than the survivors' restart (a launcher, torchrun and its
    workers start, the round's last call, the restore), so they do train alone before the VM is back."""
    out = tmp_path / "chaos"
    report, context = run_chaos(out, "topology=hybrid", "chaos.name=shrink", "elastic.on_preemption=shrink",
                                "topology.workers.min=1", "chaos.recreate_s=15", "chaos.reference=false")
    assert report["finished"] and report["final_step"] == 500, context
    assert sorted(set(report["world_sizes"])) == [2, 3], context
    assert report["lost_steps"] == 0 and report["repeated_samples"] == 0 and report["skipped_samples"] == 0, context
    assert report["vms"][0]["boots"] == 1 and 75 not in report["vms"][0]["unit_exits"], context


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
