"""The ledger: one file per incarnation, batched steps, durable local appends, GCS objects, and
failures that never reach the caller."""

from __future__ import annotations

import json
import time
import uuid

from harness.telemetry import events as ev
from harness.telemetry.ledger import Ledger, new_incarnation_id, read_ledger
from tests.gcs_emulator import FakeGCS, fake_gcs  # noqa: F401  (fake_gcs is a fixture)


def test_local_round_trip_batches_steps_and_keeps_incarnations_apart(tmp_path):
    first = Ledger(str(tmp_path), "inc-1", rank=0, node="vm-a", flush_every_s=0)
    first.event(ev.PROCESS_START, pid=1)
    for step in range(1, 6):
        first.steps_done(step, step, 0.5)
    first.event(ev.CKPT_BLOCK, step=5, seconds=0.1)  # closes the batch
    first.steps_done(6, 6, 0.5)
    first.steps_done(8, 9, 1.0)  # not contiguous: a new batch
    assert first.flush()
    first.event(ev.EXIT, code=75)
    assert first.close()
    second = Ledger(str(tmp_path), "inc-2", rank=0, node="vm-b", flush_every_s=0)
    second.event(ev.PROCESS_START, pid=2)
    second.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["inc-1.jsonl", "inc-2.jsonl"]
    events = read_ledger(str(tmp_path))
    steps = [(x["first"], x["last"], x["seconds"]) for x in events if x["kind"] == ev.STEPS]
    assert steps == [(1, 5, 2.5), (6, 6, 0.5), (8, 9, 1.0)]
    assert [x["kind"] for x in events] == [ev.PROCESS_START, ev.STEPS, ev.CKPT_BLOCK, ev.STEPS, ev.STEPS,
                                           ev.EXIT, ev.PROCESS_START]
    assert {x["incarnation"] for x in events} == {"inc-1", "inc-2"}
    assert all(x["t"] <= y["t"] for x, y in zip(events, events[1:], strict=False))
    assert events[0]["node"] == "vm-a" and events[0]["rank"] == 0


def test_explicit_time_and_pending_batch_visible_before_flush(tmp_path):
    ledger = Ledger(str(tmp_path), "inc", rank=3, node="n", flush_every_s=0)
    ledger.event(ev.PROCESS_START, t=123.0)
    ledger.steps_done(1, 1, 0.2)
    kinds = [(x["kind"], x["rank"]) for x in ledger.events()]
    assert kinds == [(ev.PROCESS_START, 3), (ev.STEPS, 3)]
    assert ledger.events()[0]["t"] == 123.0
    assert read_ledger(str(tmp_path)) == []  # nothing written before a flush


def test_torn_line_and_duplicates_are_skipped(tmp_path):
    ledger = Ledger(str(tmp_path), "inc", rank=0, node="n", flush_every_s=0)
    ledger.event(ev.PROCESS_START)
    ledger.flush()
    path = tmp_path / "inc.jsonl"
    line = path.read_text()
    path.write_text(line + line + '{"t": 5, "kind": "ste')  # a retried append, then a torn write
    ledger.event(ev.EXIT, code=0)
    ledger.flush()  # must start on a fresh line
    events = read_ledger(str(tmp_path))
    assert [x["kind"] for x in events] == [ev.PROCESS_START, ev.EXIT]


def test_background_flush_writes_heartbeats_when_idle(tmp_path):
    ledger = Ledger(str(tmp_path), "inc", rank=0, node="n", flush_every_s=0.05)
    ledger.event(ev.PROCESS_START)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kinds = [x["kind"] for x in read_ledger(str(tmp_path))]
        if ev.HEARTBEAT in kinds:
            break
        time.sleep(0.02)
    ledger.close()
    assert kinds[0] == ev.PROCESS_START and ev.HEARTBEAT in kinds


def test_unwritable_location_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ledger = Ledger(str(blocker / "ledger"), "inc", rank=0, node="n", flush_every_s=0)
    ledger.event(ev.PROCESS_START)
    assert ledger.flush() is False
    assert ledger.flush() is False
    assert ledger.errors == 2
    events = ledger.events()  # kept for the next attempt, with the failures themselves
    assert [e["kind"] for e in events] == [ev.PROCESS_START, ev.TELEMETRY_ERROR, ev.TELEMETRY_ERROR]
    assert events[-1]["count"] == 2 and "NotADirectoryError" in events[-1]["error"]


def test_incarnation_ids_are_unique_and_name_the_rank():
    ids = {new_incarnation_id(7) for _ in range(100)}
    assert len(ids) == 100 and all("-r7-" in i for i in ids)


def test_gcs_one_object_per_incarnation(fake_gcs: FakeGCS):  # noqa: F811
    bucket = f"ledger-{uuid.uuid4().hex[:8]}"
    fake_gcs.make_bucket(bucket)
    location = f"gs://{bucket}/runs/exp/ledger"
    a = Ledger(location, "inc-a", rank=0, node="vm-a", flush_every_s=0)
    a.event(ev.PROCESS_START)
    a.steps_done(1, 3, 1.5)
    assert a.flush()
    b = Ledger(location, "inc-b", rank=0, node="vm-b", flush_every_s=0)
    b.event(ev.PROCESS_START)
    assert b.flush()
    a.event(ev.EXIT, code=75)
    assert a.close()  # rewrites inc-a only; inc-b untouched
    fake_gcs.client().bucket(bucket).blob("runs/exp/ledger/nested/x.jsonl").upload_from_string("{}")

    names = sorted(blob.name for blob in fake_gcs.client().list_blobs(bucket))
    assert names == ["runs/exp/ledger/inc-a.jsonl", "runs/exp/ledger/inc-b.jsonl",
                     "runs/exp/ledger/nested/x.jsonl"]
    text = fake_gcs.client().bucket(bucket).blob("runs/exp/ledger/inc-a.jsonl").download_as_text()
    assert [json.loads(line)["kind"] for line in text.splitlines()] == [ev.PROCESS_START, ev.STEPS, ev.EXIT]
    events = read_ledger(location)
    assert sorted((x["incarnation"], x["kind"]) for x in events) == [
        ("inc-a", ev.EXIT), ("inc-a", ev.PROCESS_START), ("inc-a", ev.STEPS), ("inc-b", ev.PROCESS_START)]


def test_gcs_unreachable_is_counted_not_raised(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there
    ledger = Ledger("gs://bucket/ledger", "inc", rank=0, node="n", flush_every_s=0, timeout_s=2)
    ledger.event(ev.PROCESS_START)
    started = time.monotonic()
    assert ledger.flush() is False
    assert time.monotonic() - started < 10  # bounded by the ledger's timeout, not GCS's 120 s default
    assert ledger.errors == 1


def test_read_missing_local_ledger_is_empty(tmp_path):
    assert read_ledger(str(tmp_path / "none")) == []
