"""Sweeps (harness/sweep/): a Hydra multirun becomes jobs, each an ordinary exact run, with one table.

Real processes: `python -m harness.sweep` starts real launchers (torchrun underneath), a job is
SIGKILLed with its whole tree, the same command resumes it. The GCP queue runs in a real launcher
against the fake GCS server and the local Compute stand-in (harness/chaos/fake_compute.py: Compute
Engine has no emulator) with the local Spot cloud's metadata server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import config, job_end
from harness.chaos.fake_compute import FakeCompute
from harness.chaos.fake_metadata import FakeMetadata
from harness.plan import main as plan_main
from harness.plan import modes, plan_config, plan_mode
from harness.sweep import jobs as sweep_jobs
from harness.sweep import queue as sweep_queue
from harness.sweep.__main__ import main as sweep_main
from harness.sweep.queue import Entry, Queue
from harness.sweep.runner import root_cause
from tests import runs
from tests.gcs_emulator import FakeGCS

# Tiny, paced jobs (60 steps of >= 0.05 s): a kill can land between two checkpoints.
JOB = ["launch.nproc_per_node=1", *runs.FAST, "train.max_steps=60", "model._target_=harness.chaos.paced.PacedGPT",
       "+model.pace_s=0.05", "model.n_layer=1", "model.n_embd=32", "checkpoint.write_threads=1"]
# Two learning rates x two checkpoint cadences: the cadence changes no weight, so jobs 0 and 1 (and 2
# and 3) must end with the same model, whatever happened to them on the way.
DIMENSIONS = ["optim.lr=1e-3,3e-3", "checkpoint.interval_steps=10,20"]


def sweep_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.sweep", f"sweep.root={root}", "sweep.name=abl", *JOB, *DIMENSIONS, *extra]


def sweep_json(root: Path) -> dict:
    return json.loads((root / "abl" / "sweep.json").read_text())


def test_a_four_job_sweep_finishes_resumes_a_killed_job_exactly_and_skips_finished_jobs(tmp_path):
    root = tmp_path / "runs"
    log = tmp_path / "sweep-1.txt"
    killed = root / "abl" / "1-lr0.001-interval_steps20"
    with open(log, "wb") as out:
        proc = subprocess.Popen(sweep_cmd(root), cwd=runs.REPO, env=runs.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:  # job 0 runs whole; job 1 is killed (with its launcher, torchrun and worker) after its first checkpoint
        runs.wait_for(lambda: runs.committed(killed / "checkpoints"), timeout=180, what="job 1's first checkpoint")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    assert not (killed / "summary.json").exists(), "job 1 finished before the kill"
    first = sweep_json(root)
    assert [j["status"] for j in first["jobs"]][:2] == ["finished", "running"], runs.tail(log)
    assert [j["status"] for j in first["jobs"]][2:] == ["pending", "pending"]

    # The same command again (two at a time now): job 0 is skipped, job 1 resumes, 2 and 3 run.
    again = subprocess.run(sweep_cmd(root, "sweep.parallel=2"), cwd=runs.REPO, env=runs.env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "job 0 abl/0-lr0.001-interval_steps10 finished before (step 60): skipped" in again.stdout
    assert "job 1 abl/1-lr0.001-interval_steps20 resumed" in again.stdout
    doc = sweep_json(root)
    assert doc["dimensions"] == {"optim.lr": ["0.001", "0.003"], "checkpoint.interval_steps": ["10", "20"]}
    jobs = doc["jobs"]
    assert [j["run_name"] for j in jobs] == ["abl/0-lr0.001-interval_steps10", "abl/1-lr0.001-interval_steps20",
                                             "abl/2-lr0.003-interval_steps10", "abl/3-lr0.003-interval_steps20"]
    assert [j["swept"] for j in jobs] == [{"optim.lr": lr, "checkpoint.interval_steps": every}
                                          for lr in ("0.001", "0.003") for every in ("10", "20")]
    for j in jobs:
        assert j["status"] == "finished" and j["final_step"] == j["max_steps"] == 60, j
        assert j["loss"] > 0 and j["goodput"] > 0 and j["wandb_run_id"] and j["root_cause"] is None, j
        assert "train.max_steps=60" in j["overrides"] and set(sweep_jobs.Job(0, "", (), j["swept"]).swept_overrides) \
            <= set(j["overrides"]), j
        summary = runs.summary(root / j["run_name"])  # an ordinary run dir: summary.json as make train writes it
        assert summary["model_sha256"] == j["model_sha256"]
        assert summary["final_loss"] == pytest.approx(j["loss"], abs=1e-4)
    assert [j["restarts"] for j in jobs] == [0, 1, 0, 0], "the killed incarnation is in job 1's ledger"
    assert jobs[1]["model_sha256"] == jobs[0]["model_sha256"], "the resumed job is exact"
    assert jobs[3]["model_sha256"] == jobs[2]["model_sha256"] != jobs[0]["model_sha256"]
    assert "abl (local): 4 jobs, 4 finished" in again.stdout and again.stdout.count("│ finished │") == 4

    # Once more: every job is finished, nothing starts.
    logs = {j["run_name"]: (root / j["run_name"] / "launch.log").stat().st_size for j in jobs}
    third = subprocess.run(sweep_cmd(root), cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("skipped") == 4 and "started" not in third.stdout and "resumed" not in third.stdout
    assert logs == {j["run_name"]: (root / j["run_name"] / "launch.log").stat().st_size for j in jobs}


@pytest.mark.parametrize(("overrides", "key"), [
    (["optim.lr=1e-3,3e-4", "model.n_layrr=2,4"], "model.n_layrr"),  # an unknown key in one dimension
    (["optim.lr=1e-3,3e-4", "model.n_layer=range(2,"], "model.n_layer"),  # a malformed range
    (["model.n_layer=range(1,a)"], "model.n_layer"),  # a range of the wrong type
    (["optim.lr=1e-3", "train.max_steps=100,abc"], "train.max_steps"),  # a bad value in the second job only
    (["optim.lr=interval(0.1,1.0)"], "optim.lr"),  # continuous: no finite list of jobs
    (["run.name=mine", "optim.lr=1e-3,3e-4"], "run.name"),  # the sweep names its jobs
    (["sweep.on=cloud", "optim.lr=1e-3,3e-4"], "sweep.on"),
    (["checkpoint.store=/tmp/shared", "optim.lr=1e-3,3e-4"], "checkpoint.store"),  # jobs would share a store
])
def test_bad_overrides_start_nothing_and_name_the_key(tmp_path, capsys, overrides, key):
    assert sweep_main([f"sweep.root={tmp_path}", "sweep.name=bad", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and key in err, err
    assert not (tmp_path / "bad").exists(), "nothing was started or written"


def test_a_failed_job_shows_its_root_cause(tmp_path):
    """A job that fails (its store cannot be written: the launcher stops before torchrun) is `failed` with
    the harness's own error line; the sweep goes on to the next job and exits 1."""
    proc = subprocess.run([sys.executable, "-m", "harness.sweep", f"sweep.root={tmp_path}", "sweep.name=bad", *JOB,
                           "checkpoint.store=/proc/no-such-dir/${run.name}", "optim.lr=1e-3,3e-3"], cwd=runs.REPO,
                          env=runs.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:]
    jobs = json.loads((tmp_path / "bad" / "sweep.json").read_text())["jobs"]
    assert [(j["status"], j["exit_codes"]) for j in jobs] == [("failed", [2]), ("failed", [2])]
    assert jobs[0]["root_cause"].startswith("error: checkpoint store '/proc/no-such-dir/bad/0-lr0.001' is not writable")
    assert "failed: error: checkpoint store" in proc.stdout


# The tail of what torchrun 2.13 prints when a worker raises (`model.n_head=3`), as `make train` shows it.
TORCHRUN_REPORT = """\
[rank0]: ValueError: model.n_embd=128 must be divisible by model.n_head=3
[rank0]: hydra.errors.InstantiationException: Error in call to target 'harness.models.gpt.GPT':
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
harness.train FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 1 (pid: 29467)
  traceback : Traceback (most recent call last):
    File "/work/main/harness/models/gpt.py", line 14, in __init__
      raise ValueError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
  ValueError: model.n_embd=128 must be divisible by model.n_head=3

  The above exception was the direct cause of the following exception:

  Traceback (most recent call last):
  hydra.errors.InstantiationException: Error in call to target 'harness.models.gpt.GPT':
============================================================
training failed with exit code 1 after at most launch.max_restarts=0 restarts; the root cause is in torchrun's \
report above
"""


def test_root_cause_is_the_original_exception_under_torchruns_report():
    assert root_cause(TORCHRUN_REPORT, 1) == "ValueError: model.n_embd=128 must be divisible by model.n_head=3"
    assert root_cause("noise\nerror: checkpoint store 'gs://x' is not writable\n", 2).startswith("error: checkpoint")
    assert root_cause("nothing useful", 9) == "exit code 9"


def test_each_job_is_grouped_in_wandb_under_the_sweep_with_its_overrides_as_config(tmp_path):
    """The job's composed config (what it hands W&B) and a real offline W&B run read back."""
    from omegaconf import OmegaConf

    from harness.telemetry.wandb_reader import read_run, records
    from harness.telemetry.wandb_sink import WandbSink

    sweep = sweep_jobs.build([f"sweep.root={tmp_path}", "sweep.name=grp", "optim.lr=1e-3,3e-4", "model.n_layer=2"])
    job = sweep.jobs[1]
    cfg = config.load(sweep_jobs.local_overrides(sweep, job))
    assert cfg.run.name == "grp/1-lr0.0003" and cfg.wandb.group == "grp" and cfg.sweep.index == 1
    assert list(cfg.sweep.job_overrides) == ["optim.lr=0.0003"]
    sink = WandbSink({**OmegaConf.to_container(cfg.wandb), "dir": str(tmp_path / "wandb")}, "grp1run",
                     OmegaConf.to_container(cfg, resolve=True), name=cfg.run.name)
    sink.log_step(1, {"loss": 1.0})
    assert sink.close(timeout_s=60)
    [folder] = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    run = read_run(folder)
    assert run.run_id == "grp1run" and run.config["sweep"]["job_overrides"] == ["optim.lr=0.0003"]
    assert run.config["optim"]["lr"] == pytest.approx(3e-4)
    groups = {r.run.run_group for r in records(run.path) if r.WhichOneof("record_type") == "run"}
    assert groups == {"grp"}


def test_cost_plan_of_a_sweep_prices_every_job_and_sums_them(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when not on a terminal
    args = ["train.max_steps=20000,50000", "plan.nodes=2,4", "plan.simulate_runs=0", "sweep.max_concurrent=2"]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    batch, _ = sweep_jobs.expand([a for a in args if not a.startswith("sweep.")])
    costs = []
    for job in batch:
        p, prices, steps, setting = plan_config(job)
        costs.append([plan_mode(p, prices, m, steps, setting).cost for m in modes(p)])
    assert len(batch) == 4 and "sweep of 4 jobs" in out
    for m in range(3):  # all-Spot, hybrid, on-demand
        assert f"{sum(c[m] for c in costs):,.2f}" in out
    assert "train.max_steps=50000 plan.nodes=4" in out and "vs on-demand" in out


# --- the queue on GCP ------------------------------------------------------------------------------

def test_the_queue_starts_the_first_max_concurrent_unfinished_jobs():
    jobs = tuple(Entry(f"s/{i}", job_end.group_path("p", f"d-{i}-workers", region="r"), 2, 10) for i in range(5))
    q = Queue("s", "b", 2, jobs)
    assert q.initial_sizes() == [2, 2, 0, 0, 0]
    assert [e.run for e in q.to_start(set())] == ["s/0", "s/1"]
    assert [e.run for e in q.to_start({"s/1"})] == ["s/0", "s/2"], "a running job keeps its place"
    assert [e.run for e in q.to_start({"s/0", "s/1", "s/3"})] == ["s/2", "s/4"]
    assert q.to_start({e.run for e in jobs}) == []
    assert Queue.from_metadata(q.to_metadata()) == q and " " not in q.to_metadata()
    assert Queue("s", "b", None, jobs).initial_sizes() == [2] * 5
    with pytest.raises(ValueError, match=sweep_queue.QUEUE_KEY):
        Queue.from_metadata('{"jobs": [{"run": "x"}]}')


@pytest.fixture
def fake_compute() -> Iterator[FakeCompute]:
    with FakeCompute() as compute:
        yield compute


def test_a_finishing_job_starts_the_next_queued_one_again_after_a_preemption_and_status_reads_the_bucket(
        tmp_path, fake_gcs: FakeGCS, fake_compute: FakeCompute):
    """Job 0 of 4 (max_concurrent=2) finishes on its 'VM': its rank 0 resizes jobs 1 and 2 to their size,
    then its own groups to 0. Its VM recreated after that (as after a preemption mid-decision) finds it
    finished and takes the same decision: the same resizes, job 3 never. `make sweep-status` then reads
    every job's state from the bucket."""
    from infra import sweep as infra_sweep

    bucket = f"sweep-{uuid.uuid4().hex[:10]}"
    fake_gcs.make_bucket(bucket)
    common = [f"sweep.root={tmp_path / 'runs'}", "sweep.name=q", "sweep.max_concurrent=2",
              "infra.project=test-proj-123", f"infra.bucket.name={bucket}", "topology=all_spot",
              "topology.workers.min=1", "topology.workers.max=1",
              *runs.FAST, "train.max_steps=12", "checkpoint.interval_steps=6", "optim.lr=1e-3,2e-3,3e-3,4e-3"]
    dep = infra_sweep.load(common)
    sweep, job = dep.sweep, dep.sweep.jobs[0]
    own = job_end_groups(dep, 0)  # workers, coordinator: what its end resizes to 0
    md = FakeMetadata({job_end.GROUPS_KEY: job_end.format_groups(own), **dep.queue_metadata()})
    vm = {"GCE_METADATA_HOST": md.host, job_end.ENDPOINT_ENV: fake_compute.endpoint}
    # What startup.sh gives the job on a VM: its run dir on the local SSD, its tier in the bucket.
    on_vm = [*sweep_jobs.gcp_overrides(sweep, job), f"checkpoint.store=gs://{bucket}/runs/{job.run_name}/checkpoints"]
    starts = [(e.group, 1) for e in dep.queue.jobs[1:3]]
    try:
        first = tmp_path / "vm-1.txt"
        assert runs.run_launcher(1, [*on_vm, f"run.dir={tmp_path / 'vm1'}"], first, extra_env=vm) == 0, runs.tail(first)
        assert fake_compute.calls == [*starts, (own[0], 0), (own[1], 0)], "the next jobs first, then its own groups"
        again = tmp_path / "vm-2.txt"
        assert runs.run_launcher(1, [*on_vm, f"run.dir={tmp_path / 'vm2'}"], again, extra_env=vm) == 0, runs.tail(again)
        assert "not training again" in again.read_text()
        assert fake_compute.calls[4:] == [*starts, (own[0], 0), (own[1], 0)], "the same decision, idempotent"
    finally:
        md.close()
    assert all(group != dep.queue.jobs[3].group for group, _ in fake_compute.calls), "never more than 2 at once"

    assert sweep_main(["--status", "sweep.on=gcp", *common]) == 0
    doc = json.loads((tmp_path / "runs" / "q" / "sweep.json").read_text())
    assert doc["on"] == "gcp" and [j["status"] for j in doc["jobs"]] == ["finished", "pending", "pending", "pending"]
    done = doc["jobs"][0]
    assert done["final_step"] == 12 and done["loss"] > 0 and done["restarts"] == 0 and done["wandb_run_id"]
    assert done["durable"] == f"gs://{bucket}/runs/q/0-lr0.001/checkpoints"


def job_end_groups(dep, index: int) -> list[str]:
    from infra import vm

    return list(vm.group_paths(dep.jobs[index]).values())
