"""The job's logs in Cloud Logging (infra/logs.py): the agent config each template carries, with the
labels, and `make logs` / `python -m infra logs`, which reads them back with `gcloud logging read`.

Real: the synthesized stacks, the config composition, the CLI and the Makefile target, the release
upload (fake-gcs-server). Stubs, because there is no GCP here: `gcloud` is a script first on PATH that
records its argv and prints the entries a `gcloud logging read --format=json` would (the entries'
shape is the Ops Agent's journald entries: jsonPayload holds the journal's fields). The agent itself
is not here either: its config is checked against the schema its documentation and sources give
(receivers, processors and pipelines by id; modify_fields `labels.<key>` with exactly one of
static_value / copy_from; filters in its grammar).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness.config import ConfigError
from infra import logs, release
from infra import settings as infra_settings
from infra.__main__ import main
from infra.settings import REPO
from tests.infra.conftest import PROJECT, TOPOLOGIES

TEMPLATES = "google_compute_instance_template"
RUN = "exp1"
AGENT_DEB = "google-cloud-ops-agent_2.49.0~ubuntu24.04_amd64.deb"
UNITS = {"master": "spot-train.service", "worker": "spot-train.service", "coordinator": "spot-rendezvous.service"}
FIELD = re.compile(r"jsonPayload\.([A-Za-z_][A-Za-z0-9_]*)")  # the filter grammar's unquoted names


def template_configs(synthesized) -> dict[str, str]:
    """role -> the spot-ops-agent-config of its template, as the VM reads it."""
    out = {}
    for template in synthesized.resources(TEMPLATES).values():
        meta = template["metadata"]
        out[meta["spot-role"]] = meta[logs.CONFIG_KEY].replace("$${", "${").replace("%%{", "%{")
    return out


def check_agent_schema(config: dict) -> None:
    """What the Ops Agent accepts: every pipeline names defined receivers and processors, every
    processor and receiver has a type it knows, modify_fields sets each field from exactly one source."""
    logging = config["logging"]
    assert set(config) == {"logging"}, "metrics stay on the agent's built-in config"
    for receiver in logging["receivers"].values():
        assert receiver == {"type": "systemd_journald"}
    for processor in logging["processors"].values():
        assert processor["type"] in ("exclude_logs", "modify_fields")
        if processor["type"] == "exclude_logs":
            assert set(processor) == {"type", "match_any"} and all(isinstance(f, str) for f in processor["match_any"])
        else:
            for key, field in processor["fields"].items():
                assert re.fullmatch(r"labels\.[a-z][a-z0-9_]*", key), key
                assert len(set(field) & {"static_value", "copy_from", "move_from"}) == 1, key
                assert all(isinstance(v, str) for v in field.values())
    for name, pipeline in logging["service"]["pipelines"].items():
        assert set(pipeline.get("receivers", [])) <= set(logging["receivers"]), name
        assert set(pipeline.get("processors", [])) <= set(logging["processors"]), name


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_template_carries_the_agent_config_with_the_roles_labels(topologies, topology):
    s = topologies[topology]
    configs = template_configs(s)
    assert set(configs) == ({"coordinator", "worker"} if topology == "all_spot" else {"master", "worker"})
    for role, text in configs.items():
        config = yaml.safe_load(text)
        check_agent_schema(config)
        pipeline = config["logging"]["service"]["pipelines"][logs.LOG_ID]
        assert pipeline == {"receivers": [logs.LOG_ID], "processors": ["spot_only_the_job", "spot_labels"]}
        # rsyslog's copy of the same journal is not shipped a second time, unlabelled.
        assert config["logging"]["service"]["pipelines"]["default_pipeline"] == {"receivers": []}
        labels = {k.removeprefix("labels."): v for k, v in
                  config["logging"]["processors"]["spot_labels"]["fields"].items()}
        assert tuple(labels) == logs.LABELS
        assert labels["spot_role"] == {"static_value": role}
        assert labels["spot_run"] == {"static_value": s.settings.run_id}
        assert labels["spot_deployment"] == {"static_value": "spot-train"}
        assert labels["spot_vm"] == {"copy_from": "jsonPayload._HOSTNAME"}  # each entry's own VM ...
        assert labels["spot_incarnation"] == {"copy_from": "jsonPayload._BOOT_ID"}  # ... and boot
        (kept,) = config["logging"]["processors"]["spot_only_the_job"]["match_any"]
        assert kept.startswith("NOT (") and kept.endswith(")") and kept.count("(") == kept.count(")")
        assert kept.count('"') % 2 == 0
        names = set(FIELD.findall(kept))
        assert names == {"_SYSTEMD_UNIT", "UNIT", "_TRANSPORT", "MESSAGE"}
        assert f'jsonPayload._SYSTEMD_UNIT = "{UNITS[role]}"' in kept
        other = "spot-rendezvous.service" if UNITS[role] == "spot-train.service" else "spot-train.service"
        assert other not in kept
        for script_unit in ("google-startup-scripts.service", "google-shutdown-scripts.service"):
            assert f'jsonPayload._SYSTEMD_UNIT = "{script_unit}"' in kept


def test_the_run_and_deployment_labels_follow_the_config(synth):
    s = synth(f"run.name={RUN}", "infra.name=lab2")
    for role, text in template_configs(s).items():
        fields = yaml.safe_load(text)["logging"]["processors"]["spot_labels"]["fields"]
        assert fields["labels.spot_run"] == {"static_value": RUN}, role
        assert fields["labels.spot_deployment"] == {"static_value": "lab2"}, role


def test_logs_off_leaves_the_templates_without_the_config(synth):
    s = synth("infra.logs.enabled=false")
    assert all(logs.CONFIG_KEY not in t["metadata"] for t in s.resources(TEMPLATES).values())
    assert not [w for w in infra_settings.warnings(s.settings) if "Ops Agent" in w]


def test_the_node_identities_may_write_logs_and_the_logging_api_is_on(topologies):
    s = topologies["all_spot"]
    writers = [m for m in s.resources("google_project_iam_member").values() if m["role"] == "roles/logging.logWriter"]
    assert sorted("iam_trainer" in m["member"] for m in writers) == [False, True]  # trainer and coordinator
    assert "logging.googleapis.com" in {p["service"] for p in s.resources("google_project_service").values()}
    viewer = next(b for b in s.resources("google_storage_bucket_iam_member").values()
                  if b["role"] == "roles/storage.objectViewer")
    assert "/objects/agents/" in viewer["condition"]["expression"], "the coordinator installs the release's agent"


# --- make logs ------------------------------------------------------------------------------------

# `gcloud logging read ... --format=json` for a stub: records its argv, prints $STUB_ENTRIES.
GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("STUB_GCLOUD_RC"):
    sys.exit("ERROR: (gcloud.logging.read) PERMISSION_DENIED: the caller does not have permission")
sys.stdout.write(open(os.environ["STUB_ENTRIES"]).read())
"""
BOOT_1 = "3f2a9c1b0d4e4d0f9c1a2b3c4d5e6f70"  # the journal's _BOOT_ID: 32 hex digits
BOOT_2 = "8c7d6e5f4a3b4c2d9e1f0a1b2c3d4e5f"
MASTER_BOOT = "11112222333344445555666677778888"


def entry(t: str, vm: str, role: str, boot: str, unit: str, text: str | list[int]) -> dict:
    """A LogEntry as the Ops Agent writes one from the journal (jsonPayload: the journal's fields)."""
    return {
        "insertId": f"{vm}-{t}", "logName": f"projects/{PROJECT}/logs/{logs.LOG_ID}", "timestamp": t,
        "resource": {"type": "gce_instance", "labels": {"instance_id": "123", "zone": "us-central1-a"}},
        "labels": {"spot_deployment": "spot-train", "spot_run": RUN, "spot_role": role, "spot_vm": vm,
                   "spot_incarnation": boot, "compute.googleapis.com/resource_name": vm},
        "jsonPayload": {"MESSAGE": text, "_SYSTEMD_UNIT": unit, "_BOOT_ID": boot, "_HOSTNAME": vm, "PRIORITY": "6"},
        "severity": "INFO",
    }


# Newest first, as `--order=desc` returns them: a worker preempted and recreated under its name.
ENTRIES = [
    entry("2026-11-23T10:05:02.000001Z", "spot-train-worker-ab12", "worker", BOOT_2, "spot-train.service",
          "restored step 400 from gs://b/runs/exp1/checkpoints"),
    entry("2026-11-23T10:04:30.5Z", "spot-train-worker-ab12", "worker", BOOT_2, "google-startup-scripts.service",
          "startup-script: spot-startup: role: worker"),
    entry("2026-11-23T10:01:00Z", "spot-train-worker-ab12", "worker", BOOT_1, "google-shutdown-scripts.service",
          "shutdown-script: spot-shutdown: marker appeared after 2140 ms: emergency checkpoint saved"),
    entry("2026-11-23T10:00:59Z", "spot-train-master", "master", MASTER_BOOT, "spot-train.service",
          list(b"step 410 loss 2.71\r")),  # journald keeps a line with a control character as bytes
]


@pytest.fixture
def gcloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stub gcloud first on PATH; `gcloud.calls()` is the argv of each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "gcloud"
    stub.write_text(GCLOUD)
    stub.chmod(0o755)
    log, found = tmp_path / "gcloud-calls.jsonl", tmp_path / "entries.json"
    found.write_text(json.dumps(ENTRIES))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_ENTRIES": str(found)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def entries(these: list[dict]) -> None:
        found.write_text(json.dumps(these))

    return SimpleNamespace(env=env, calls=calls, entries=entries)


def test_make_logs_prints_the_runs_log_across_vms_and_incarnations_oldest_first(gcloud):
    # The Makefile target as a user runs it (-o: the venv exists; never reinstall it from a test).
    result = subprocess.run(["make", "-s", "-o", ".venv/.installed", "logs",
                             f"ARGS=run.name={RUN} infra.project={PROJECT} --freshness=6h --limit=50"],
                            cwd=REPO, env={**os.environ, **gcloud.env}, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    (argv,) = gcloud.calls()
    assert argv[:2] == ["logging", "read"]
    query = argv[2]
    assert f'labels.spot_run="{RUN}"' in query.split(" AND ")
    assert 'labels.spot_deployment="spot-train"' in query.split(" AND ")
    assert f'logName="projects/{PROJECT}/logs/{logs.LOG_ID}"' in query.split(" AND ")
    assert argv[3:] == [f"--project={PROJECT}", "--freshness=6h", "--limit=50", "--order=desc", "--format=json"]
    assert result.stdout.splitlines() == [
        "2026-11-23T10:00:59Z spot-train-master master 11112222 train: step 410 loss 2.71\\r",
        "2026-11-23T10:01:00Z spot-train-worker-ab12 worker 3f2a9c1b shutdown: shutdown-script: spot-shutdown: "
        "marker appeared after 2140 ms: emergency checkpoint saved",
        "2026-11-23T10:04:30.5Z spot-train-worker-ab12 worker 8c7d6e5f startup: startup-script: spot-startup: "
        "role: worker",
        "2026-11-23T10:05:02.000001Z spot-train-worker-ab12 worker 8c7d6e5f train: restored step 400 from "
        "gs://b/runs/exp1/checkpoints",
    ]


def test_role_and_vm_narrow_the_query(gcloud):
    assert main(["logs", f"run.name={RUN}", f"infra.project={PROJECT}", "--role", "worker",
                 "--vm", "spot-train-worker-ab12"]) == 0
    (argv,) = gcloud.calls()
    terms = argv[2].split(" AND ")
    assert 'labels.spot_role="worker"' in terms and 'labels.spot_vm="spot-train-worker-ab12"' in terms
    assert "--freshness=1d" in argv and "--limit=1000" in argv  # the defaults


def test_no_entries_says_so_and_what_to_try(gcloud, capsys):
    gcloud.entries([])
    assert main(["logs", f"run.name={RUN}", f"infra.project={PROJECT}"]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert "no entries in the last 1d" in out.err and f'labels.spot_run="{RUN}"' in out.err
    assert "--freshness" in out.err


@pytest.mark.parametrize("args, message", [
    ([f"infra.project={PROJECT}"], "run.name is not given: make logs prints the logs of one run"),
    ([f"run.name={RUN}"], "infra.project='my-gcp-project' is the placeholder; set infra.project="),
    ([f"run.name={RUN}", "infra.project=Not_A_Project"], "infra.project='Not_A_Project' is not valid"),
    ([f"run.name={RUN}", f"infra.project={PROJECT}", "--freshness=yesterday"], "--freshness='yesterday' is not a"),
    ([f"run.name={RUN}", f"infra.project={PROJECT}", "--limit=0"], "--limit=0 must be >= 1"),
    (["run.name=a b", f"infra.project={PROJECT}"], "run.name='a b' is not valid"),
])
def test_bad_input_names_the_key_and_never_calls_gcloud(gcloud, capsys, args, message):
    assert main(["logs", *args]) == 2
    assert message in capsys.readouterr().err
    assert gcloud.calls() == []


def test_a_failing_gcloud_fails_the_command_with_its_message(gcloud, capfd, monkeypatch):
    monkeypatch.setenv("STUB_GCLOUD_RC", "1")
    assert main(["logs", f"run.name={RUN}", f"infra.project={PROJECT}"]) == 1
    err = capfd.readouterr().err  # gcloud's own message, on the terminal's stderr
    assert "PERMISSION_DENIED" in err and "error: gcloud logging read" in err and "failed (exit 1)" in err


def test_without_gcloud_it_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud anywhere
    assert main(["logs", f"run.name={RUN}", f"infra.project={PROJECT}"]) == 2
    assert "`gcloud` is not on PATH: install the Google Cloud CLI" in capsys.readouterr().err


def test_a_line_per_entry_shows_vm_role_incarnation_and_source():
    kernel = entry("t", "vm-1", "worker", BOOT_1, "", "NVRM: Xid (PCI:0000:00:04): 79, GPU has fallen off the bus")
    kernel["jsonPayload"]["_TRANSPORT"] = "kernel"
    systemd = entry("t", "vm-1", "worker", BOOT_1, "init.scope", "spot-train.service: Main process exited, status=1")
    systemd["jsonPayload"]["UNIT"] = "spot-train.service"
    assert logs.line(kernel) == ("t vm-1 worker 3f2a9c1b kernel: NVRM: Xid (PCI:0000:00:04): 79, GPU has fallen "
                                 "off the bus")
    assert logs.line(systemd).startswith("t vm-1 worker 3f2a9c1b systemd: spot-train.service: Main process")
    rdzv = entry("t", "spot-train-coordinator", "coordinator", BOOT_1, "spot-rendezvous.service", "store up")
    assert logs.line(rdzv) == "t spot-train-coordinator coordinator 3f2a9c1b rendezvous: store up"


# --- the agent in the release ---------------------------------------------------------------------

@pytest.fixture
def agent_deb(tmp_path: Path) -> Path:
    deb = tmp_path / AGENT_DEB
    deb.write_bytes(b"!<arch>\nops agent package v1")
    return deb


def package_override(path: Path) -> str:
    return f'infra.logs.agent_package="{path}"'  # quoted: the package's name holds a `~`


def test_an_agent_package_must_be_an_ops_agent_deb_that_exists(tmp_path, agent_deb):
    other = tmp_path / "fluent-bit_3.0_amd64.deb"
    other.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"infra.logs.agent_package='.*fluent-bit_3.0_amd64.deb' is not an Ops "
                                          r"Agent package; allowed: a file named google-cloud-ops-agent_"):
        infra_settings.load([package_override(other)])
    with pytest.raises(ConfigError, match=r"infra.logs.agent_package=.* does not exist; download it first"):
        infra_settings.load([package_override(tmp_path / "missing" / AGENT_DEB)])
    s = infra_settings.load([package_override(agent_deb)])
    assert release.agent_package(s) == agent_deb
    assert not [w for w in infra_settings.warnings(s) if "Ops Agent" in w]
    assert [w for w in infra_settings.warnings(infra_settings.load([])) if "Ops Agent" in w], \
        "without a package, synth says the logs depend on the image"


def test_the_agent_package_is_part_of_the_release_version(agent_deb):
    plain = release.version(infra_settings.load([]))
    assert plain == release.version()
    carried = release.version(infra_settings.load([package_override(agent_deb)]))
    assert carried != plain
    agent_deb.write_bytes(b"!<arch>\nops agent package v2")
    assert release.version(infra_settings.load([package_override(agent_deb)])) not in (plain, carried)


def test_publish_uploads_the_agent_once_under_agents_with_its_sha256(fake_gcs, agent_deb, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    bucket = fake_gcs.make_bucket(f"logs-{os.getpid()}-{tmp_path.name[-12:]}".lower().replace("_", "-"))
    s = infra_settings.load([f"infra.project={PROJECT}", f"infra.bucket.name={bucket.name}",
                             package_override(agent_deb)])
    wheel = tmp_path / "spot_harness-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")

    release.publish(s, "v-logs", wheel, [])

    manifest = json.loads(bucket.blob("releases/v-logs/manifest.json").download_as_bytes())
    entry_ = manifest["files"][f"agents/{AGENT_DEB}"]
    assert entry_ == {"object": f"agents/{AGENT_DEB}", "sha256": hashlib.sha256(agent_deb.read_bytes()).hexdigest()}
    assert bucket.blob(f"agents/{AGENT_DEB}").download_as_bytes() == agent_deb.read_bytes()
    generation = bucket.get_blob(f"agents/{AGENT_DEB}").generation
    release.publish(s, "v-logs-2", wheel, [])
    assert bucket.get_blob(f"agents/{AGENT_DEB}").generation == generation, "uploaded once, shared by releases"
