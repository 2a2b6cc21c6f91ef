"""A sweep on Google Cloud (infra/sweep.py): `python -m infra synth --multirun` of a 3-job sweep is one
deployment (one network, one bucket, one set of identities) with a worker MIG per job, each template
carrying its job's overrides (escaped for Terraform) and the queue, and `sweep.max_concurrent`
respected in the initial sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import job_end
from harness.config import ConfigError
from harness.sweep.queue import QUEUE_KEY, Queue
from infra import sweep as infra_sweep
from infra.__main__ import main as infra_main
from tests.infra.conftest import PROJECT
from tests.infra.test_infra_synth import unescape

WORKERS = "google_compute_region_instance_group_manager"
TEMPLATES = "google_compute_instance_template"
# A swept value with both Terraform template sequences, quoted for Hydra: it must reach the VM unchanged.
ODD = "'%{x}${run.name}'"


def by_job(resources: dict, what: str) -> dict[int, dict]:
    """Resources of one kind per job index, from their construct path (<stack>/job<i>/...)."""
    out = {}
    for body in resources.values():
        path = body["//"]["metadata"]["path"].split("/")
        if path[1].startswith("job") and path[-1].startswith(what):
            out[int(path[1].removeprefix("job"))] = body
    return dict(sorted(out.items()))


def test_a_three_job_sweep_is_one_deployment_with_a_worker_mig_per_job(tmp_path: Path, startup_dir: Path, capsys):
    overrides = [f"infra.project={PROJECT}", f"infra.outdir={tmp_path / 'out'}", f"infra.startup_dir={startup_dir}",
                 f"sweep.root={tmp_path / 'runs'}", "sweep.name=abl", "sweep.max_concurrent=2", "topology=all_spot",
                 "topology.workers.min=2", "topology.workers.max=2", "train.max_steps=500",
                 "optim.lr=1e-3,3e-4,1e-4", f"wandb.project={ODD}"]
    assert infra_main(["synth", "--multirun", *overrides]) == 0
    out = capsys.readouterr().out
    tf = json.loads((tmp_path / "out" / "stacks" / "spot-train" / "cdk.tf.json").read_text())
    r = tf["resource"]
    for shared in ("google_compute_network", "google_compute_subnetwork", "google_storage_bucket",
                   "google_compute_router_nat", "google_project_iam_custom_role", "google_monitoring_dashboard"):
        assert len(r[shared]) == 1, shared
    assert len(r["google_service_account"]) == 2, "the trainers' and the coordinators' accounts, once"

    dep = infra_sweep.load(overrides)
    runs = [job.run_name for job in dep.sweep.jobs]
    assert runs == ["abl/0-lr0.001", "abl/1-lr0.0003", "abl/2-lr0.0001"]
    migs = by_job(r[WORKERS], "workers")
    assert [m["name"] for m in migs.values()] == [f"spot-train-{i}-workers" for i in range(3)]
    assert [m["target_size"] for m in migs.values()] == [2, 2, 0], "max_concurrent=2: the third job waits"
    assert all(m["lifecycle"]["ignore_changes"] == ["target_size"] for m in migs.values()), "the queue owns the sizes"
    templates = by_job(r[TEMPLATES], "worker-template")
    coordinators = by_job(r[TEMPLATES], "coordinator-template")
    assert len(templates) == len(coordinators) == len(by_job(r["google_compute_instance_group_manager"], "master")) == 3

    for i, t in templates.items():
        template_ref = migs[i]["version"][0]["instance_template"]
        assert template_ref.startswith(f"${{google_compute_instance_template.job{i}_worker")
        meta = t["metadata"]
        assert meta["spot-run-id"] == runs[i] and coordinators[i]["metadata"]["spot-run-id"] == runs[i]
        vm_overrides = unescape(meta["spot-hydra-overrides"]).split(" ")
        lr = ["0.001", "0.0003", "0.0001"][i]
        assert f"optim.lr={lr}" in vm_overrides and f"run.name={runs[i]}" in vm_overrides
        assert f"wandb.project={ODD}" in vm_overrides and "wandb.group=abl" in vm_overrides
        assert "%%{x}$${run.name}" in meta["spot-hydra-overrides"], "escaped: Terraform reads no template sequence"
        assert "train.max_steps=500" in vm_overrides and f"sweep.index={i}" in vm_overrides
        own = job_end.parse_groups(meta[job_end.GROUPS_KEY])
        assert own == [f"projects/{PROJECT}/regions/us-central1/instanceGroupManagers/spot-train-{i}-workers",
                       f"projects/{PROJECT}/zones/us-central1-a/instanceGroupManagers/spot-train-{i}-coordinator"]
        queue = Queue.from_metadata(unescape(meta[QUEUE_KEY]))
        assert queue == dep.queue and [e.run for e in queue.jobs] == runs and queue.max_concurrent == 2
        assert [e.group for e in queue.jobs] == [dep.queue.jobs[n].group for n in range(3)]
        assert QUEUE_KEY not in coordinators[i]["metadata"], "only the trainers decide"
    assert queue.initial_sizes() == [2, 2, 0]

    [grant] = [m for m in r["google_project_iam_member"].values() if "condition" in m]
    for path in dep.groups():  # every job's groups: a finishing job resizes the next one's
        assert f'resource.name.endsWith("/{path.split("/", 2)[2]}")' in grant["condition"]["expression"]
    assert tf["output"]["worker_migs"]["value"][2] == "${google_compute_region_instance_group_manager.job2_workers_" \
        + next(k for k in r[WORKERS] if k.startswith("job2_")).removeprefix("job2_workers_") + ".name}"
    record = json.loads((tmp_path / "runs" / "abl" / "sweep.json").read_text())
    assert record["on"] == "gcp" and [j["run_name"] for j in record["jobs"]] == runs, out


@pytest.mark.parametrize(("overrides", "key"), [
    (["infra.region=us-central1,europe-west4"], "infra.region"),  # one deployment: infra is not swept
    (["topology=hybrid", "sweep.max_concurrent=1"], "topology"),  # a queued job's on-demand master would bill
    (["topology=all_spot", "model.n_layrr=2,4"], "model.n_layrr"),
    (["topology=all_spot", "topology.workers.max=1,abc"], "topology.workers.max"),
])
def test_a_sweep_deployment_refuses_what_one_deployment_cannot_be(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        infra_sweep.load([f"infra.project={PROJECT}", "sweep.name=bad", "optim.lr=1e-3,3e-4", *overrides])
