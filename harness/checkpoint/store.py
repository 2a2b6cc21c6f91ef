"""Where committed checkpoints live. A store holds checkpoints by step; a checkpoint exists in a store
only once its manifest is there, and the manifest is always the last thing written.

Beside the checkpoints a store keeps small JSON records by name (`finished.json`: the job's end,
harness/job_end.py), written whole or not at all.

A checkpoint that cannot be trusted (fails verification, or is newer than the one a restore chose)
is quarantined, never deleted: it stops being committed (the step can be saved again) and its files
are kept under `quarantine/` with a `reason.json` (what failed, when, which incarnation), until a
person runs `python -m harness.checkpoint purge-quarantine STORE`.

`open_store(url)` in tiers.py picks the implementation: a local path (local SSD, persistent disk) or
gs:// (gcs_store.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from harness.checkpoint.manifest import (
    MANIFEST,
    CorruptCheckpoint,
    Manifest,
    fsync_dir,
    verify_local_files,
    write_durably,
)

STEP_DIR = re.compile(r"^step_(\d{9})$")
RECORD_NAME = re.compile(r"^[a-z][a-z0-9_-]*\.json$")  # at the top: never a step, `latest` or a temp file
TMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
REASON = "reason.json"


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


def quarantine_name(step: int) -> str:
    """A fresh name under quarantine/: the same step may be quarantined more than once."""
    return f"{step_dirname(step)}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@dataclass
class Quarantined:
    """A checkpoint moved aside: where it is now and why (the reason.json, {} if none was written)."""

    name: str
    where: str
    reason: dict


@dataclass
class Transfer:
    """Bounds on a copy into a store: `deadline` (time.monotonic()) for every call it makes, and
    `stop`, set by whoever abandons the copy (an emergency save that needs the bandwidth)."""

    deadline: float | None = None
    stop: threading.Event | None = None

    def check(self, what: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise TransferAbandoned(f"{what}: abandoned (an emergency save needed the time)")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TransferAbandoned(f"{what}: out of time")

    def remaining(self, default: float) -> float:
        return default if self.deadline is None else max(0.1, min(default, self.deadline - time.monotonic()))


class StoreError(RuntimeError):
    """A store that cannot be used: the message names the store URL and the reason."""


class CommitConflict(StoreError):
    """Another writer committed this step first; ours is abandoned, theirs stays intact."""

    def __init__(self, url: str, step: int, ours: str, theirs: str | None = None):
        by = f" (attempt {theirs})" if theirs else ""
        super().__init__(f"checkpoint store {url!r}: step {step} was already committed by another writer{by}; "
                         f"this attempt ({ours}) is abandoned")


class TransferAbandoned(StoreError):
    """A copy stopped before its commit, on purpose: nothing was committed."""


class Store(ABC):
    url: str
    is_local: bool = False
    takes_shares: bool = False  # a multi-node checkpoint can be assembled here, one node's share at a time

    @abstractmethod
    def check_access(self) -> None:
        """Fail with StoreError naming the store when it cannot be read and written."""

    @abstractmethod
    def committed_steps(self) -> list[int]:
        """Steps whose manifest is present (not yet verified), ascending."""

    @abstractmethod
    def read_manifest(self, step: int) -> Manifest: ...

    @abstractmethod
    def verify(self, step: int) -> Manifest:
        """Read the manifest and check every file; CorruptCheckpoint names the file and reason."""

    @abstractmethod
    def put_committed(self, step: int, src_dir: Path, manifest: Manifest, transfer: Transfer | None = None) -> None:
        """Copy a committed checkpoint's files in, then write its manifest last (the commit); within
        `transfer`'s bounds, or TransferAbandoned with nothing committed."""

    def put_share(self, step: int, src_dir: Path, manifest: Manifest, transfer: Transfer | None = None) -> bool:
        """Upload one node's share of a multi-node checkpoint (`manifest` is the job-wide one); True once
        every share is there and the step is committed. Only a store shared by every node can."""
        raise StoreError(f"checkpoint store {self.url!r} holds one node's files only: a multi-node checkpoint "
                         "needs a tier every node writes to (gs://)")

    @abstractmethod
    def fetch(self, step: int, scratch: Path) -> Path:
        """A local directory holding the checkpoint's files (downloaded into scratch if remote)."""

    @abstractmethod
    def delete(self, step: int) -> None: ...

    @abstractmethod
    def cleanup_uncommitted(self, older_than_s: float) -> list[str]:
        """Remove leftovers of saves that never committed; returns what was removed."""

    @abstractmethod
    def quarantine(self, step: int, reason: dict) -> str:
        """Uncommit `step` and keep its files under quarantine/ with `reason`; returns where."""

    @abstractmethod
    def quarantined(self) -> list[Quarantined]: ...

    @abstractmethod
    def purge_quarantine(self) -> list[str]:
        """Delete everything under quarantine/ (on a person's request only); returns what went."""

    @abstractmethod
    def read_record(self, name: str) -> dict | None:
        """The JSON object stored as record `name` beside the checkpoints; None when there is none.
        StoreError names the record when it cannot be read or is not a JSON object."""

    @abstractmethod
    def write_record(self, name: str, record: dict) -> None:
        """Store (or replace) record `name`, whole: a reader sees the old one or the new one."""

    @abstractmethod
    def delete_record(self, name: str) -> bool:
        """Remove record `name`; True when there was one."""


class LocalStore(Store):
    """A directory: each checkpoint is `step_XXXXXXXXX/` made by renaming a finished temp directory."""

    is_local = True

    def __init__(self, path: str):
        self.url = path
        self.root = Path(path).expanduser()

    def step_dir(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def attempt_dir(self, step: int, attempt: str) -> Path:
        return self.root / f"{TMP_PREFIX}{step_dirname(step)}-{attempt}"

    def check_access(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise StoreError(f"checkpoint store {self.url!r} is not writable: {err.strerror or err}") from None

    def committed_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]
        return sorted(steps)

    def read_manifest(self, step: int) -> Manifest:
        path = self.step_dir(step) / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptCheckpoint(str(path), "manifest missing") from None
        return Manifest.of_step(data, step, str(path))

    def verify(self, step: int) -> Manifest:
        manifest = self.read_manifest(step)
        verify_local_files(self.step_dir(step), manifest)
        return manifest

    def commit(self, attempt_dir: Path, manifest: Manifest) -> Path:
        """Make a fully written attempt directory the checkpoint of its step, atomically."""
        write_durably(attempt_dir / MANIFEST, manifest.to_json().encode())
        fsync_dir(attempt_dir)
        final = self.step_dir(manifest.step)
        try:
            os.rename(attempt_dir, final)
        except OSError as err:
            if final.exists():
                raise CommitConflict(self.url, manifest.step, attempt_dir.name) from None
            raise StoreError(f"checkpoint store {self.url!r}: commit failed: {err}") from None
        fsync_dir(self.root)
        return final

    def put_committed(self, step: int, src_dir: Path, manifest: Manifest, transfer: Transfer | None = None) -> None:
        transfer = transfer or Transfer()
        attempt = self.attempt_dir(step, manifest.attempt or "copy")
        if attempt.exists():
            shutil.rmtree(attempt)
        attempt.mkdir(parents=True)
        for name in manifest.files:
            transfer.check(f"checkpoint store {self.url!r}: copy of step {step}")
            dst = attempt / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_dir / name, dst)
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())
        transfer.check(f"checkpoint store {self.url!r}: commit of step {step}")
        self.commit(attempt, manifest)

    def fetch(self, step: int, scratch: Path) -> Path:
        return self.step_dir(step)

    def delete(self, step: int) -> None:
        # Rename first so a crash mid-delete never leaves a half-deleted directory that looks committed.
        doomed = self.root / f"{TMP_PREFIX}deleting-{step_dirname(step)}-{time.time_ns()}"
        os.rename(self.step_dir(step), doomed)
        shutil.rmtree(doomed)

    def cleanup_uncommitted(self, older_than_s: float) -> list[str]:
        if not self.root.is_dir():
            return []
        removed = []
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith(TMP_PREFIX) and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def quarantine(self, step: int, reason: dict) -> str:
        """Reason first (inside the step, where nothing reads it), then one rename out of the listing."""
        dest = self.root / QUARANTINE / quarantine_name(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self.step_dir(step) / REASON, json.dumps(reason, indent=1).encode())
        os.rename(self.step_dir(step), dest)
        fsync_dir(self.root)
        return str(dest)

    def quarantined(self) -> list[Quarantined]:
        folder = self.root / QUARANTINE
        if not folder.is_dir():
            return []
        return [Quarantined(p.name, str(p), _read_reason(p / REASON)) for p in sorted(folder.iterdir()) if p.is_dir()]

    def purge_quarantine(self) -> list[str]:
        gone = [q.name for q in self.quarantined()]
        for name in gone:
            shutil.rmtree(self.root / QUARANTINE / name)
        return gone

    def read_record(self, name: str) -> dict | None:
        path = self.root / record_name(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise StoreError(f"checkpoint store {self.url!r}: cannot read {path}: {err}") from None
        return parse_record(text, str(path))

    def write_record(self, name: str, record: dict) -> None:
        """A temp file (cleaned by cleanup_uncommitted if left behind), fsynced, renamed over the record."""
        path = self.root / record_name(name)
        tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_durably(tmp, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
            os.replace(tmp, path)
            fsync_dir(self.root)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"checkpoint store {self.url!r}: cannot write {path}: {err}") from None

    def delete_record(self, name: str) -> bool:
        path = self.root / record_name(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True


def record_name(name: str) -> str:
    """`name` if it can name a record (lowercase, `.json`), else ValueError: a record must never
    collide with a step folder, `latest`, quarantine/ or a temp file."""
    if not RECORD_NAME.match(name):
        raise ValueError(f"record name {name!r} must match {RECORD_NAME.pattern}")
    return name


def parse_record(text: str, where: str) -> dict:
    """A record's JSON object; StoreError naming `where` when the text is not one."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise StoreError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise StoreError(f"{where}: not a JSON object")
    return record


def _read_reason(path: Path) -> dict:
    try:
        reason = json.loads(path.read_text())
        return reason if isinstance(reason, dict) else {"reason": str(reason)}
    except (OSError, ValueError):
        return {}
