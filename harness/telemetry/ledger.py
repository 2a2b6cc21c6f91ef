"""The job's ledger: an append-only event log that outlives every process of the job.

Goodput computed inside one process forgets everything at each preemption; the ledger does not. It
lives in the checkpoint store's durable tier (`<tier>/ledger`), and each process incarnation owns
exactly one file there, `<incarnation>.jsonl`, that no other process ever writes:
- a local directory: new lines are appended, flushed and fsynced;
- `gs://bucket/prefix`: the incarnation's own object is rewritten with all of its events (GCS objects
  cannot be appended to; a ledger is small), never touching another incarnation's object.

Events are buffered in memory and written by a background thread every `flush_every_s`
(`telemetry.ledger_flush_s`; a heartbeat when nothing else happened) and by `flush()`, which
Telemetry calls at a process's start and exit. A process killed without warning thus loses at most
the last `flush_every_s` of its events, and never its start while the store takes writes. Step
completions are batched: consecutive steps merge into one `steps` event that is closed by any other
event or by a flush, so the ledger stays ordered and small. A write that fails never raises: it is
recorded as a `telemetry_error` event and retried at the next flush.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from harness.telemetry import events as ev
from harness.telemetry.backoff import Backoff

SUFFIX = ".jsonl"
FOLDER = "ledger"


def ledger_location(durable_url: str) -> str:
    """Where a job's ledger lives: beside the checkpoints, in the store's durable tier."""
    return f"{durable_url.rstrip('/')}/{FOLDER}"


def new_incarnation_id(rank: int) -> str:
    """Unique per process start, sortable by time: `20261123T094100Z-r0-1a2b3c`."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-r{rank}-{secrets.token_hex(3)}"


def storage_client():
    """A google-cloud-storage client; anonymous against an emulator (STORAGE_EMULATOR_HOST)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator")
        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client()


def split_gs(url: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return bucket, prefix.strip("/")


class Ledger:
    def __init__(self, location: str, incarnation: str, rank: int, node: str,
                 flush_every_s: float = 30.0, timeout_s: float = 30.0):
        self.location = location.rstrip("/")
        self.incarnation = incarnation
        self.rank = rank
        self.node = node
        self.timeout_s = timeout_s
        self._events: list[dict[str, Any]] = []
        self._written = 0  # events already in the file (local appends only the rest)
        self._pending: dict[str, Any] | None = None  # the open `steps` batch
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._dirty = False
        self.backoff = Backoff(f"ledger:{self.location}", on_error=self._record_error)
        self._bucket = None  # a GCS bucket handle, made on first write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_every_s > 0:
            self._thread = threading.Thread(target=self._run, args=(flush_every_s,),
                                            name="ledger-flush", daemon=True)
            self._thread.start()

    @property
    def errors(self) -> int:
        return self.backoff.errors

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append an event stamped now (or at `t=` when the caller knows better) and return it."""
        record = {"t": fields.pop("t", time.time()), "kind": kind, "incarnation": self.incarnation,
                  "rank": self.rank, "node": self.node, **fields}
        with self._lock:
            self._close_pending()
            self._events.append(record)
            self._dirty = True
        return record

    def steps_done(self, first: int, last: int, seconds: float) -> None:
        """Record steps first..last (inclusive) as completed, `seconds` of step time in all; merged
        with the open batch while the steps follow on from it."""
        now = time.time()
        with self._lock:
            p = self._pending
            if p is not None and first == p["last"] + 1:
                p["last"] = last
                p["seconds"] += seconds
                p["t"] = now
            else:
                self._close_pending()
                self._pending = {"t": now, "kind": ev.STEPS, "incarnation": self.incarnation,
                                 "rank": self.rank, "node": self.node,
                                 "first": first, "last": last, "seconds": seconds}
            self._dirty = True

    def events(self) -> list[dict[str, Any]]:
        """This incarnation's events so far, the open step batch included."""
        with self._lock:
            return [dict(e) for e in self._events] + ([dict(self._pending)] if self._pending else [])

    def flush(self) -> bool:
        """Write everything buffered; False (counted, logged once) when the store did not take it."""
        with self._write_lock:
            with self._lock:
                self._close_pending()
                snapshot = list(self._events)
                self._dirty = False
            try:
                if self.location.startswith("gs://"):
                    self._write_gcs(snapshot)
                else:
                    self._append_local(snapshot[self._written:])
            except Exception as err:
                with self._lock:
                    self._dirty = True
                self.backoff.failed(err)
                return False
            self._written = len(snapshot)
            self.backoff.succeeded()
            return True

    def close(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)
        return self.flush()

    def _record_error(self, sink: str, error: str, count: int) -> None:
        """A failed write is itself a ledger event, written once the store takes writes again."""
        self.event(ev.TELEMETRY_ERROR, sink=sink, error=error, count=count)

    def _close_pending(self) -> None:
        if self._pending is not None:
            self._events.append(self._pending)
            self._pending = None

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                idle = not self._dirty
            if idle:
                self.event(ev.HEARTBEAT)
            if self.backoff.ready():
                self.flush()

    def _append_local(self, new: list[dict[str, Any]]) -> None:
        if not new:
            return
        directory = Path(self.location)
        directory.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in new).encode()
        with open(directory / f"{self.incarnation}{SUFFIX}", "ab+") as f:
            # A failed earlier write may have left a torn line: end it, so it cannot swallow ours.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    body = b"\n" + body
            f.write(body)
            f.flush()
            os.fsync(f.fileno())

    def _write_gcs(self, snapshot: list[dict[str, Any]]) -> None:
        bucket, prefix = split_gs(self.location)
        if self._bucket is None:
            self._bucket = storage_client().bucket(bucket)
        name = f"{prefix}/{self.incarnation}{SUFFIX}" if prefix else f"{self.incarnation}{SUFFIX}"
        body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in snapshot)
        from google.cloud.storage.retry import DEFAULT_RETRY

        # Rewriting the whole object is idempotent, so retrying is safe; within our own deadline.
        self._bucket.blob(name).upload_from_string(body, content_type="application/x-ndjson",
                                                   timeout=self.timeout_s,
                                                   retry=DEFAULT_RETRY.with_timeout(self.timeout_s))


def read_ledger(location: str) -> list[dict[str, Any]]:
    """Every incarnation's events, sorted by time. Torn lines (a process killed mid-write), lines
    repeated by a retried append, and files that are not ledgers are skipped."""
    location = location.rstrip("/")
    texts: list[str] = []
    if location.startswith("gs://"):
        bucket, prefix = split_gs(location)
        blobs = storage_client().list_blobs(bucket, prefix=f"{prefix}/" if prefix else None, delimiter="/")
        texts = [b.download_as_text() for b in blobs if b.name.endswith(SUFFIX)]
    else:
        directory = Path(location)
        if directory.is_dir():
            texts = [p.read_text(encoding="utf-8") for p in sorted(directory.glob(f"*{SUFFIX}"))]
    out: list[dict[str, Any]] = []
    for text in texts:
        for line in dict.fromkeys(text.splitlines()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "t" in record and "kind" in record:
                out.append(record)
    out.sort(key=lambda e: e["t"])
    return out
