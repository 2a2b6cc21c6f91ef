"""`make deploy | plan | destroy` against a stub `terraform` that records its calls, and the release
published to fake-gcs-server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from infra import release
from infra.__main__ import main
from infra.settings import REPO
from tests.infra.conftest import PROJECT

STUB = """#!/bin/sh
printf '%s\\t%s\\n' "$PWD" "$*" >> "$STUB_LOG"
"""


@pytest.fixture
def cli(tmp_path: Path, startup_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `python -m infra` in-process with a stub terraform first on PATH and credentials present."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "terraform"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "terraform-calls.log"
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    outdir = tmp_path / "out"

    def run(command: str, *args: str) -> tuple[int, list[tuple[str, str]]]:
        rc = main([command, f"infra.project={PROJECT}", f"infra.outdir={outdir}", f"infra.startup_dir={startup_dir}",
                   *args])
        calls = [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []
        return rc, calls

    run.stack_dir = outdir / "stacks" / "spot-train"  # type: ignore[attr-defined]
    run.bin_dir = bin_dir  # type: ignore[attr-defined]
    return run


def test_deploy_applies_a_saved_plan_then_publishes_the_release(cli, fake_gcs):
    bucket = fake_gcs.make_bucket(f"{PROJECT}-spot-ckpt")
    rc, calls = cli("deploy", "topology=all_spot")
    assert rc == 0
    stack_dir = str(cli.stack_dir)
    assert calls == [(stack_dir, "init -input=false"), (stack_dir, "plan -input=false -out=tfplan"),
                     (stack_dir, "apply -input=false tfplan")]
    assert (cli.stack_dir / "cdk.tf.json").is_file()

    version = release.version()
    prefix = f"releases/{version}/"
    names = {b.name.removeprefix(prefix) for b in bucket.list_blobs(prefix=prefix)}
    wheels = [n for n in names if n.endswith(".whl")]
    assert len(wheels) == 1 and wheels[0].startswith("spot_harness-")
    assert {"manifest.json", "requirements.txt", "conf/config.yaml", "conf/topology/hybrid.yaml"} <= names
    manifest = json.loads(bucket.blob(prefix + "manifest.json").download_as_bytes())
    assert manifest["release"] == version and set(manifest["files"]) == names - {"manifest.json"}
    requirements = bucket.blob(prefix + "requirements.txt").download_as_text()
    assert "hydra-core==" in requirements and "torch" not in requirements and "cdktf" not in requirements
    assert (REPO / "conf" / "config.yaml").read_bytes() == bucket.blob(prefix + "conf/config.yaml").download_as_bytes()
    # The VMs are told to install exactly this release.
    template = json.loads((cli.stack_dir / "cdk.tf.json").read_text())["resource"]["google_compute_instance_template"]
    assert {t["metadata"]["spot-release"] for t in template.values()} == {version}


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
