"""`make deploy | plan | destroy` against a stub `terraform` that records its calls and a stub `gcloud`
that answers the prerequisite checks (there is no GCP here: stubs on PATH are how `make deploy` is
tested), with the release published to fake-gcs-server and the Compute API's resize calls recorded by a
local HTTP server (harness/chaos/fake_compute.py: there is no Compute emulator).

The deploys here run as for an image that brings torch (`infra.image.torch=2.13.0
infra.wheelhouse.torch=false`): the CUDA build of torch and its CUDA libraries are gigabytes, so the
wheelhouse built here holds everything else, for the real target platform (tests/infra/test_wheelhouse.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from harness import job_end
from harness.chaos.fake_compute import FakeCompute
from harness.checkpoint.gcs_store import GCSStore
from infra import release
from infra.__main__ import main
from infra.settings import REPO
from tests.infra.conftest import PROJECT, TORCH_IN_IMAGE

# Each call also records whether the release's manifest is in the bucket at that moment.
STUB = """#!/bin/sh
published=$(curl -s -o /dev/null -w '%{http_code}' "$STORAGE_EMULATOR_HOST/storage/v1/b/$STUB_BUCKET/o/$STUB_MANIFEST")
printf '%s\\t%s\\t%s\\n' "$PWD" "$*" "$published" >> "$STUB_LOG"
"""
# gcloud's answers to the prerequisite checks; STUB_GCLOUD_* take parts away.
GCLOUD = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["projects", "describe"]:
    if os.environ.get("STUB_GCLOUD_NO_PROJECT"):
        sys.exit("ERROR: (gcloud.projects.describe) NOT_FOUND: project " + args[2])
    print(args[2])
elif args[:2] == ["services", "list"]:
    default = "serviceusage.googleapis.com cloudresourcemanager.googleapis.com compute.googleapis.com"
    print("\\n".join(os.environ.get("STUB_GCLOUD_APIS", default).split()))
elif args[:3] == ["compute", "regions", "describe"]:
    limit = float(os.environ.get("STUB_GCLOUD_GPU_LIMIT", "16"))
    print(json.dumps({"quotas": [{"metric": m, "limit": limit, "usage": 0.0} for m in (
        "NVIDIA_A100_GPUS", "PREEMPTIBLE_NVIDIA_A100_GPUS", "CPUS")]}))
else:
    sys.exit(f"gcloud stub: unexpected {args}")
"""
MASTER_GROUP = f"projects/{PROJECT}/zones/us-central1-a/instanceGroupManagers/spot-train-master"


@pytest.fixture
def cli(tmp_path: Path, startup_dir: Path, wheelhouse_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `python -m infra` in-process with stub terraform and gcloud first on PATH, credentials present
    and the Compute API's resize recorded (`cli.compute`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("terraform", STUB), ("gcloud", GCLOUD)):
        stub = bin_dir / name
        stub.write_text(text)
        stub.chmod(0o755)
    monkeypatch.setenv("STUB_BUCKET", f"{PROJECT}-spot-ckpt")
    monkeypatch.setenv("STUB_MANIFEST", f"releases%2F{release.version()}%2Fmanifest.json")
    log = tmp_path / "terraform-calls.log"
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    compute = FakeCompute()
    monkeypatch.setenv(job_end.ENDPOINT_ENV, compute.endpoint)
    outdir = tmp_path / "out"

    def run(command: str, *args: str) -> tuple[int, list[tuple[str, str]]]:
        rc = main([command, f"infra.project={PROJECT}", f"infra.outdir={outdir}", f"infra.startup_dir={startup_dir}",
                   f"infra.wheelhouse.cache_dir={wheelhouse_cache}", *args])
        calls = [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []
        return rc, calls

    run.stack_dir = outdir / "stacks" / "spot-train"  # type: ignore[attr-defined]
    run.bin_dir = bin_dir  # type: ignore[attr-defined]
    run.compute = compute  # type: ignore[attr-defined]
    yield run
    compute.close()


def test_deploy_publishes_the_release_between_the_foundation_and_the_instance_groups(cli, fake_gcs):
    bucket = fake_gcs.make_bucket(f"{PROJECT}-spot-ckpt")
    rc, calls = cli("deploy", "topology=all_spot", *TORCH_IN_IMAGE)
    assert rc == 0
    stack_dir = str(cli.stack_dir)
    assert {c[0] for c in calls} == {stack_dir}
    assert [c[1].split(" -target=")[0] for c in calls] == [
        "init -input=false", "plan -input=false", "apply -input=false tfplan-foundation",
        "plan -input=false -out=tfplan", "apply -input=false tfplan"]
    # Phase 1 applies only the foundation; the manifest appears before phase 2 plans the instance groups.
    assert [c[2] for c in calls] == ["404", "404", "404", "200", "200"]
    targets = [t.split("=", 1)[1] for t in calls[1][1].split() if t.startswith("-target=")]
    assert calls[1][1].endswith("-out=tfplan-foundation")
    tf = json.loads((cli.stack_dir / "cdk.tf.json").read_text())
    kinds = {t.split(".")[0] for t in targets}
    assert {"google_project_service", "google_storage_bucket", "google_storage_bucket_iam_member",
            "google_service_account", "google_project_iam_member"} <= kinds
    assert not kinds & {"google_compute_region_instance_group_manager", "google_compute_instance_group_manager",
                        "google_compute_instance_template", "google_monitoring_alert_policy"}
    assert all(t.split(".")[1] in tf["resource"][t.split(".")[0]] for t in targets)

    version = release.version()
    prefix = f"releases/{version}/"
    names = {b.name.removeprefix(prefix) for b in bucket.list_blobs(prefix=prefix)}
    harness = [n for n in names if n.endswith(".whl")]
    assert len(harness) == 1 and harness[0].startswith("spot_harness-")
    assert {"manifest.json", "requirements.txt", "conf/config.yaml", "conf/topology/hybrid.yaml"} <= names
    manifest = json.loads(bucket.blob(prefix + "manifest.json").download_as_bytes())
    assert manifest["release"] == version and manifest["python"] == "3.12"
    wheels = {b.name for b in bucket.list_blobs(prefix="wheels/")}
    assert set(manifest["files"]) == (names - {"manifest.json"}) | wheels
    for path, entry in manifest["files"].items():  # every file with the sha256 of what was uploaded
        assert hashlib.sha256(bucket.blob(entry["object"]).download_as_bytes()).hexdigest() == entry["sha256"], path
    requirements = bucket.blob(prefix + "requirements.txt").download_as_text().split()
    assert "hydra_core==1.3.8" in requirements and any(r.startswith("antlr4_python3_runtime==") for r in requirements)
    assert not [r for r in requirements if r.split("==")[0].lower().replace("_", "-") in release.NOT_ON_VMS | {"torch"}]
    assert any(w.startswith("wheels/pip-") for w in wheels), "pip bootstraps the VM's venv"
    assert (REPO / "conf" / "config.yaml").read_bytes() == bucket.blob(prefix + "conf/config.yaml").download_as_bytes()
    # The VMs are told to install exactly this release.
    template = tf["resource"]["google_compute_instance_template"]
    assert {t["metadata"]["spot-release"] for t in template.values()} == {version}
    # The master's group (its size is not Terraform's) is asked for its one VM after the apply.
    assert cli.compute.calls == [(MASTER_GROUP.replace("spot-train-master", "spot-train-coordinator"), 1)]

    # A second deploy uploads no wheel again.
    generations = {b.name: b.generation for b in bucket.list_blobs(prefix="wheels/")}
    assert cli("deploy", "topology=all_spot", *TORCH_IN_IMAGE)[0] == 0
    assert {b.name: b.generation for b in bucket.list_blobs(prefix="wheels/")} == generations


def test_a_finished_run_is_not_deployed_again_unless_asked(cli, fake_gcs, capsys):
    fake_gcs.make_bucket(f"{PROJECT}-spot-ckpt")
    run = f"done-{uuid.uuid4().hex[:8]}"
    store = GCSStore(f"gs://{PROJECT}-spot-ckpt/runs/{run}/checkpoints")
    job_end.record(store, 500, "ab" * 32)
    rc, calls = cli("deploy", f"run.name={run}", *TORCH_IN_IMAGE)
    assert rc == 2 and not calls and not cli.stack_dir.exists(), "refused before building anything"
    err = capsys.readouterr().err
    assert f"run.name={run!r} finished at step 500" in err and "--resume-finished" in err
    assert job_end.read(store) is not None

    rc, calls = cli("deploy", f"run.name={run}-2", *TORCH_IN_IMAGE)
    assert rc == 0 and calls, "another run name deploys"
    rc, calls = cli("deploy", f"run.name={run}", "--resume-finished", *TORCH_IN_IMAGE)
    assert rc == 0 and calls[-1][1] == "apply -input=false tfplan"
    assert f"--resume-finished: removed gs://{PROJECT}-spot-ckpt/runs/{run}/checkpoints/finished.json" in \
        capsys.readouterr().out
    assert job_end.read(store) is None, "the VMs of the run train again"
    assert cli.compute.calls == [(MASTER_GROUP, 1)] * 2, "the master's group is back to one VM"


def test_a_missing_project_stops_the_deploy_before_anything(cli, monkeypatch, capsys):
    monkeypatch.setenv("STUB_GCLOUD_NO_PROJECT", "1")
    rc, calls = cli("deploy", *TORCH_IN_IMAGE)
    assert rc == 2 and not calls and not cli.stack_dir.exists()
    assert f"project '{PROJECT}' does not exist or this identity cannot see it" in capsys.readouterr().err


def test_missing_bootstrap_apis_are_named_with_the_command_that_enables_them(cli, monkeypatch, capsys):
    monkeypatch.setenv("STUB_GCLOUD_APIS", "compute.googleapis.com")
    rc, calls = cli("deploy", *TORCH_IN_IMAGE)
    assert rc == 2 and not calls
    assert ("run `gcloud services enable serviceusage.googleapis.com cloudresourcemanager.googleapis.com "
            f"--project={PROJECT}`") in capsys.readouterr().err


def test_too_little_gpu_quota_stops_the_deploy_naming_each_quota(cli, monkeypatch, capsys):
    monkeypatch.setenv("STUB_GCLOUD_GPU_LIMIT", "2")
    rc, calls = cli("deploy", *TORCH_IN_IMAGE)  # hybrid: 1 on-demand A100 + 4 Spot A100
    assert rc == 2 and not calls
    err = capsys.readouterr().err
    assert "GPU quota in us-central1 is too low: PREEMPTIBLE_NVIDIA_A100_GPUS: limit 2, needs 4" in err
    assert "NVIDIA_A100_GPUS: limit 2, needs 1" not in err


def test_quota_is_checked_after_the_foundation_enables_compute(cli, fake_gcs, monkeypatch, capsys):
    fake_gcs.make_bucket(f"{PROJECT}-spot-ckpt")
    monkeypatch.setenv("STUB_GCLOUD_APIS", "serviceusage.googleapis.com cloudresourcemanager.googleapis.com")
    monkeypatch.setenv("STUB_GCLOUD_GPU_LIMIT", "0")
    rc, calls = cli("deploy", *TORCH_IN_IMAGE)
    assert rc == 2
    assert [c[1].split(" -target=")[0] for c in calls] == [
        "init -input=false", "plan -input=false", "apply -input=false tfplan-foundation"]
    out, err = capsys.readouterr()
    assert "compute.googleapis.com is not enabled yet" in out and "GPU quota in us-central1 is too low" in err


def test_plan_and_destroy(cli):
    rc, calls = cli("plan")
    assert rc == 0 and [c[1] for c in calls] == ["init -input=false", "plan -input=false"]
    rc, calls = cli("destroy", "--yes")
    assert rc == 0 and [c[1] for c in calls[2:]] == ["init -input=false", "destroy -auto-approve"]
    assert {c[0] for c in calls} == {str(cli.stack_dir)}


def test_without_terraform_or_tofu_nothing_happens(cli, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(cli.bin_dir.parent / "empty"))
    rc, calls = cli("deploy")
    assert rc == 2 and not calls
    err = capsys.readouterr().err
    assert "neither `terraform` (>= 1.5) nor `tofu` is on PATH: install Terraform" in err
    assert not cli.stack_dir.exists(), "failed before synthesizing anything"


def test_without_credentials_nothing_happens(cli, monkeypatch, capsys, tmp_path):
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc, calls = cli("deploy")
    assert rc == 2 and not calls and not cli.stack_dir.exists()
    assert "run `gcloud auth application-default login`" in capsys.readouterr().err


def test_placeholder_project_is_refused(cli, capsys):
    rc, calls = cli("plan", "infra.project=my-gcp-project")
    assert rc == 2 and not calls
    assert "infra.project='my-gcp-project' is the placeholder" in capsys.readouterr().err


def test_make_targets_run_the_cli():
    out = subprocess.run(["make", "-n", "deploy", "synth", "ARGS=topology=all_spot infra.project=p-123456"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/python -m infra deploy topology=all_spot infra.project=p-123456" in out
    assert ".venv/bin/python -m infra synth topology=all_spot infra.project=p-123456" in out
