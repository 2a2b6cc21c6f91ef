"""The job's end is the deployment's end (harness/job_end.py): real launchers under torchrun write the
`finished` record, and a relaunch of the finished run trains nothing and resizes the instance groups
to 0. The Compute API is a local HTTP server that records the calls (harness/chaos/fake_compute.py: there is
no Compute emulator); the VM's metadata is the local Spot cloud's fake metadata server."""

from __future__ import annotations

import calendar
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import job_end
from harness.chaos.fake_compute import FakeCompute
from harness.chaos.fake_metadata import FakeMetadata
from harness.checkpoint.gcs_store import GCSStore
from harness.checkpoint.store import LocalStore, StoreError, step_dirname
from harness.preemption import gce_metadata as metadata
from tests import runs
from tests.gcs_emulator import FakeGCS

WORKERS = job_end.group_path("test-proj", "spot-train-workers", region="us-central1")
MASTER = job_end.group_path("test-proj", "spot-train-master", zone="us-central1-a")
SHORT = ["train.max_steps=12", "checkpoint.interval_steps=6"]


@pytest.fixture
def fake_compute() -> Iterator[FakeCompute]:
    with FakeCompute() as compute:
        yield compute


@pytest.fixture
def vm(fake_compute: FakeCompute) -> Iterator[dict[str, str]]:
    """The environment of a training VM: its metadata names both groups; the Compute API is the fake."""
    md = FakeMetadata({job_end.GROUPS_KEY: job_end.format_groups([WORKERS, MASTER])})
    try:
        yield {"GCE_METADATA_HOST": md.host, job_end.ENDPOINT_ENV: fake_compute.endpoint}
    finally:
        md.close()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def trained_steps(log: Path) -> list[str]:
    return re.findall(r"step \d+/\d+", log.read_text(errors="replace"))


def test_the_end_is_recorded_and_a_relaunch_trains_nothing_and_stops_the_groups(tmp_path, vm, fake_compute):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = [*SHORT, f"run.dir={run_dir}"]
    first = tmp_path / "first.txt"
    assert runs.run_launcher(1, overrides, first, extra_env=vm) == 0, runs.tail(first)
    summary = runs.summary(run_dir)
    record = json.loads((run_dir / "checkpoints" / job_end.RECORD).read_text())
    assert record["step"] == summary["final_step"] == 12
    assert record["model_sha256"] == summary["model_sha256"]
    assert record["checkpoint_step"] == 12
    assert abs(time.time() - calendar.timegm(time.strptime(record["time"], "%Y-%m-%dT%H:%M:%SZ"))) < 600
    assert fake_compute.calls == [(WORKERS, 0), (MASTER, 0)], "rank 0 stops both groups, workers first"
    assert fake_compute.authorized == [False, False], "anonymous against an endpoint override"
    assert f"job end: {WORKERS} resized to 0" in first.read_text()

    # The VM booted again after the end (autohealing, a late recreate): nothing trains, nothing is written.
    before = files(run_dir)
    again = tmp_path / "again.txt"
    assert runs.run_launcher(1, overrides, again, extra_env=vm) == 0, runs.tail(again)
    text = again.read_text()
    finished = [line for line in text.splitlines() if "not training again" in line]
    assert len(finished) == 1 and "finished at step 12" in finished[0] and record["model_sha256"][:12] in finished[0]
    assert "torch.distributed.run" not in text and not trained_steps(again)
    assert files(run_dir) == before, "no new steps in the ledger, no checkpoint, no summary"
    assert fake_compute.calls[2:] == [(WORKERS, 0), (MASTER, 0)]

    # The same run asked to go further is not finished: it trains on and records its new end.
    further = tmp_path / "further.txt"
    assert runs.run_launcher(1, ["train.max_steps=18", "checkpoint.interval_steps=6", f"run.dir={run_dir}"],
                             further, extra_env=vm) == 0, runs.tail(further)
    assert trained_steps(further) == ["step 15/18", "step 18/18"], "from the final checkpoint on"
    assert json.loads((run_dir / "checkpoints" / job_end.RECORD).read_text())["step"] == 18


def test_gcs_a_recreated_vm_finds_the_record_in_the_bucket(tmp_path, fake_gcs: FakeGCS, vm, fake_compute):  # noqa: F811
    bucket = f"end-{uuid.uuid4().hex[:10]}"
    fake_gcs.make_bucket(bucket)
    store = f"gs://{bucket}/runs/r1/checkpoints"
    first = tmp_path / "first.txt"
    assert runs.run_launcher(1, [*SHORT, f"run.dir={tmp_path / 'vm1'}", f"checkpoint.store={store}"], first,
                             extra_env=vm) == 0, runs.tail(first)
    done = job_end.read(GCSStore(store))
    assert done is not None and done.step == 12 and done.checkpoint_step == 12
    assert done.model_sha256 == runs.summary(tmp_path / "vm1")["model_sha256"]
    objects = {b.name: b.generation for b in fake_gcs.client().list_blobs(bucket)}
    assert f"runs/r1/checkpoints/{job_end.RECORD}" in objects

    # A recreated VM: blank disks, the same bucket.
    fresh = tmp_path / "vm2"
    again = tmp_path / "again.txt"
    assert runs.run_launcher(1, [*SHORT, f"run.dir={fresh}", f"checkpoint.store={store}"], again,
                             extra_env=vm) == 0, runs.tail(again)
    assert "not training again" in again.read_text() and not trained_steps(again)
    assert {b.name: b.generation for b in fake_gcs.client().list_blobs(bucket)} == objects, "the bucket is untouched"
    assert not (fresh / "staging").exists() or not any((fresh / "staging").rglob("step_*"))
    assert fake_compute.calls == [(WORKERS, 0), (MASTER, 0)] * 2


# --- the pieces, in-process ---------------------------------------------------------------------------

@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path, fake_gcs: FakeGCS):
    if request.param == "local":
        return LocalStore(str(tmp_path / "ckpt"))
    bucket = f"rec-{uuid.uuid4().hex[:10]}"
    fake_gcs.make_bucket(bucket)
    return GCSStore(f"gs://{bucket}/run", retry_deadline_s=3.0)


def test_records_beside_the_checkpoints(store):
    assert store.read_record(job_end.RECORD) is None and job_end.read(store) is None
    store.write_record(job_end.RECORD, {"step": 1, "model_sha256": "a", "time": "t", "checkpoint_step": None})
    done = job_end.record(store, 40, "ab" * 32)
    assert job_end.read(store) == done and done.checkpoint_step is None, "replaced whole; no checkpoint yet"
    assert store.committed_steps() == [] and store.cleanup_uncommitted(0.0) == []
    assert store.read_record(job_end.RECORD) is not None, "cleanup leaves records alone"
    assert store.delete_record(job_end.RECORD) is True and store.delete_record(job_end.RECORD) is False
    assert job_end.read(store) is None
    for bad in ("latest", step_dirname(3), "../x.json", "Finished.json"):
        with pytest.raises(ValueError, match="record name"):
            store.read_record(bad)


def test_a_record_that_is_not_one_is_named(store):
    store.write_record(job_end.RECORD, {"step": "many"})
    with pytest.raises(StoreError, match=rf"{re.escape(job_end.location(store))}: not a finished record"):
        job_end.read(store)


def test_a_corrupt_local_record_is_named(tmp_path):
    store = LocalStore(str(tmp_path))
    (tmp_path / job_end.RECORD).write_text("{trunc")
    with pytest.raises(StoreError, match=rf"{re.escape(str(tmp_path / job_end.RECORD))}: not JSON"):
        store.read_record(job_end.RECORD)


def test_resize_retries_transient_errors_and_names_a_refusal(fake_compute, monkeypatch):  # noqa: F811
    monkeypatch.setenv(job_end.ENDPOINT_ENV, fake_compute.endpoint)
    fake_compute.fail = [503, 429]
    assert job_end.resize(WORKERS, 0, retry_s=10)["status"] == "RUNNING"
    assert fake_compute.calls == [(WORKERS, 0)] * 3
    fake_compute.fail = [403]
    with pytest.raises(job_end.ResizeError, match=rf"{MASTER} to 0 failed: HTTP 403 .*{job_end.RESIZE_PERMISSION}"):
        job_end.resize(MASTER, 0)
    assert len(fake_compute.calls) == 4, "a refusal is not retried"
    fake_compute.fail = [503] * 50
    t0 = time.monotonic()
    with pytest.raises(job_end.ResizeError, match="HTTP 503"):
        job_end.resize(MASTER, 0, retry_s=2)
    assert time.monotonic() - t0 < 10


def test_a_failed_resize_is_printed_with_the_command_that_does_it(fake_compute, monkeypatch, capsys):  # noqa: F811
    md = FakeMetadata({job_end.GROUPS_KEY: job_end.format_groups([WORKERS, MASTER])})
    try:
        monkeypatch.setenv("GCE_METADATA_HOST", md.host)
        monkeypatch.setenv(job_end.ENDPOINT_ENV, fake_compute.endpoint)
        fake_compute.fail = [404]
        job_end.stop_groups()
        out, err = capsys.readouterr()
        assert ("gcloud compute instance-groups managed resize spot-train-workers --size=0 --region=us-central1 "
                "--project=test-proj") in err
        assert f"{MASTER} resized to 0" in out, "one failure does not stop the next group"
        md.attributes[job_end.GROUPS_KEY] = "spot-train-workers"
        job_end.stop_groups()
        assert f"metadata key {job_end.GROUPS_KEY}='spot-train-workers'" in capsys.readouterr().err
        del md.attributes[job_end.GROUPS_KEY]
        assert job_end.instance_groups() == []
        # A stand-in metadata server never leads to the real API.
        md.attributes[job_end.GROUPS_KEY] = WORKERS
        monkeypatch.delenv(job_end.ENDPOINT_ENV)
        calls = len(fake_compute.calls)
        job_end.stop_groups()
        assert "no real instance group is resized" in capsys.readouterr().err and len(fake_compute.calls) == calls
    finally:
        md.close()


def test_off_gce_there_are_no_groups(monkeypatch):
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    monkeypatch.setattr(metadata, "DEFAULT_HOST", "metadata.invalid")  # .invalid never resolves
    assert metadata.attribute(job_end.GROUPS_KEY) is None and job_end.instance_groups() == []


def test_group_paths_are_checked():
    assert job_end.parse_groups(f" {WORKERS}  {MASTER} ") == [WORKERS, MASTER]
    with pytest.raises(ValueError, match="region or a zone"):
        job_end.group_path("p", "g", region="r", zone="z")
    with pytest.raises(ValueError, match="not a resource path"):
        job_end.resize("projects/p/zones/z/instances/vm", 0)
