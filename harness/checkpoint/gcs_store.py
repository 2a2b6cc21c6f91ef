"""Checkpoints in Google Cloud Storage, `gs://bucket/prefix`.

Layout under the prefix:
    step_000000100/<attempt>/<file>   one save attempt's files: racing writers never share an object
    step_000000100/manifest.json      the commit, written last and only if absent (ifGenerationMatch=0)
    latest                            {"step": N}, a hint for people and tools; moved back only by quarantine
    finished.json                     a record (Store.write_record): one object, replaced whole
    quarantine/step_000000100-<time>-<id>/   a quarantined checkpoint: its manifest, its attempt's
                                      objects and reason.json (the step itself is uncommitted)
GCS has no rename, so the commit has to be a single object write; the precondition makes the first
writer win and every later one get a CommitConflict.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

import google_crc32c
from google.api_core import exceptions as api
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption
from google.cloud.storage.retry import DEFAULT_RETRY

from harness.bucket_names import bucket_name_problem
from harness.checkpoint.manifest import MANIFEST, CorruptCheckpoint, FileEntry, Manifest
from harness.checkpoint.store import (
    QUARANTINE,
    REASON,
    STEP_DIR,
    CommitConflict,
    Quarantined,
    Store,
    StoreError,
    Transfer,
    parse_record,
    quarantine_name,
    record_name,
    step_dirname,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

LATEST = "latest"
_LATEST_TRIES = 5
_PROBE_DEADLINE_S = 5.0  # check_access answers quickly even when the endpoint is unreachable
# What a GCS call can fail with once its retries are spent (requests' errors are OSErrors).
_FAILURES = (api.GoogleAPIError, GoogleAuthError, DataCorruption, OSError)


def parse_gs_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of gs://bucket/prefix; StoreError naming the URL and the rules otherwise."""
    if not url.startswith("gs://"):
        raise StoreError(f"checkpoint store {url!r}: not a gs:// URL; use gs://bucket/prefix")
    bucket, _, prefix = url[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    if problem := bucket_name_problem(bucket):
        raise StoreError(f"checkpoint store {url!r}: not a valid bucket name ({problem}); use gs://bucket/prefix")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreError(
            f"checkpoint store {url!r}: the prefix may not have empty, '.' or '..' parts; use gs://bucket/a/b"
        )
    return bucket, prefix


def _b64(crc_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(crc_hex)).decode()


def _hex(crc_b64: str | None) -> str | None:
    """GCS reports crc32c as base64 of the big-endian value; manifests hold 8 hex digits."""
    return base64.b64decode(crc_b64).hex() if crc_b64 else None


class _HashingWriter:
    """Checksums bytes on their way to disk, so a download is verified without reading it back."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.crc = google_crc32c.Checksum()

    def write(self, data: bytes) -> int:
        self.crc.update(data)
        return self.f.write(data)


class GCSStore(Store):
    takes_shares = True

    def __init__(
        self,
        url: str,
        retry_deadline_s: float = 120.0,
        workers: int = 8,
        chunk_size: int = 32 << 20,
        project: str | None = None,
    ):
        """`retry_deadline_s` bounds the retries of each GCS call on transient errors; `workers` is the
        number of parallel transfers (the client's connection pool holds 10); files over 8 MiB are
        sent as resumable uploads in `chunk_size` pieces (a multiple of 256 KiB); `project` is the
        client's project, None to infer it (a VM's own; `make deploy` passes infra.project, since a
        person's credentials may name none)."""
        self.url = url
        self.bucket_name, self.prefix = parse_gs_url(url)
        if chunk_size <= 0 or chunk_size % (256 << 10):
            raise ValueError(f"chunk_size {chunk_size} is not a positive multiple of 256 KiB")
        self.workers = workers
        self.chunk_size = chunk_size
        self._retry = DEFAULT_RETRY.with_timeout(retry_deadline_s).with_delay(
            initial=0.25, maximum=8.0, multiplier=2.0
        )
        self._project = project
        self._client: storage.Client | None = None
        self._lock = threading.Lock()

    # ---- plumbing

    @property
    def client(self) -> storage.Client:
        """Built on first use, so constructing a store never touches the network or credentials."""
        with self._lock:
            if self._client is None:
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    project = self._project or os.environ.get("GOOGLE_CLOUD_PROJECT", "local")
                    self._client = storage.Client(project=project, credentials=AnonymousCredentials())
                elif self._project:
                    self._client = storage.Client(project=self._project)
                else:
                    self._client = storage.Client()
            return self._client

    @property
    def bucket(self) -> storage.Bucket:
        return self.client.bucket(self.bucket_name)

    def _name(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _gs(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{name}"

    def _list(self, under: str) -> Iterator[storage.Blob]:
        return self.client.list_blobs(self.bucket, prefix=self._name(under), retry=self._retry)

    def _relative(self, blob: storage.Blob) -> str:
        return blob.name[len(self.prefix) + 1 :] if self.prefix else blob.name

    def _parallel(self, fn: Callable[[str], T], items: Iterable[str]) -> list[T]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gcs")
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, start nothing more

    @contextmanager
    def _failing_as(self, doing: str) -> Iterator[None]:
        """GCS or network failures left after retries become StoreError naming the store."""
        try:
            yield
        except (StoreError, CorruptCheckpoint):
            raise
        except _FAILURES as err:
            raise StoreError(f"checkpoint store {self.url!r}: {doing} failed: {err}") from err

    def _delete_blob(self, name: str) -> None:
        try:
            self.bucket.blob(name).delete(retry=self._retry)
        except api.NotFound:
            pass  # already gone, or our own retried delete landed

    # ---- Store

    def check_access(self) -> None:
        """Write, read, list and delete a probe object, within a few seconds even if GCS is unreachable."""
        retry = self._retry.with_timeout(_PROBE_DEADLINE_S)
        name = self._name("tmp", f"probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            probe = self.bucket.blob(name)
            probe.upload_from_string(b"ok", retry=retry, timeout=_PROBE_DEADLINE_S)
            probe.download_as_bytes(retry=retry, timeout=_PROBE_DEADLINE_S)
            next(
                iter(self.client.list_blobs(self.bucket, prefix=probe.name, max_results=1, retry=retry)), None
            )
            probe.delete(retry=retry, timeout=_PROBE_DEADLINE_S)
        except api.NotFound:
            raise StoreError(
                f"checkpoint store {self.url!r}: bucket {self.bucket_name!r} does not exist"
            ) from None
        except (api.Forbidden, api.Unauthorized) as err:
            raise StoreError(
                f"checkpoint store {self.url!r}: not allowed to write, read, list and delete objects "
                f"(needs roles/storage.objectAdmin): {err.message}"
            ) from None
        except _FAILURES as err:
            raise StoreError(f"checkpoint store {self.url!r}: cannot reach GCS: {err}") from err

    def committed_steps(self) -> list[int]:
        """Listed from the manifests themselves: `latest` is only a hint and may lag."""
        steps = set()
        with self._failing_as("listing checkpoints"):
            for blob in self._list("step_"):
                step_dir, _, rest = self._relative(blob).partition("/")
                if rest == MANIFEST and (m := STEP_DIR.match(step_dir)):
                    steps.add(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step `latest` points at (None when absent or unreadable); committed_steps() is the truth."""
        with self._failing_as("reading latest"):
            return self._read_latest()[0]

    def read_manifest(self, step: int) -> Manifest:
        name = self._name(step_dirname(step), MANIFEST)
        where = self._gs(name)
        with self._failing_as(f"reading {where}"):
            try:
                data = self.bucket.blob(name).download_as_bytes(retry=self._retry)
            except api.NotFound:
                raise CorruptCheckpoint(where, "manifest missing") from None
        return Manifest.of_step(data, step, where)

    def verify(self, step: int) -> Manifest:
        """Sizes and CRC32Cs from the object metadata (GCS computed them on upload): no download."""
        manifest = self.read_manifest(step)
        folder = f"{step_dirname(step)}/{manifest.attempt}/"
        with self._failing_as(f"verifying step {step}"):
            blobs = {self._relative(b): b for b in self._list(folder)}
        for name, expected in sorted(manifest.files.items()):
            blob = blobs.get(folder + name)
            where = self._gs(self._name(folder + name))
            if blob is None:
                raise CorruptCheckpoint(where, "missing object listed in the manifest")
            if blob.size != expected.size:
                raise CorruptCheckpoint(where, f"size {blob.size} bytes, manifest says {expected.size}")
            if (actual := _hex(blob.crc32c)) != expected.crc32c:
                raise CorruptCheckpoint(where, f"crc32c {actual}, manifest says {expected.crc32c}")
        return manifest

    def put_committed(self, step: int, src_dir: Path, manifest: Manifest, transfer: Transfer | None = None) -> None:
        """Upload the files in parallel into this attempt's folder, then commit with the manifest.
        Any failure raises StoreError before the manifest is written, so nothing half-done is committed."""
        transfer = transfer or Transfer()
        self._upload_all(step, src_dir, manifest, sorted(manifest.files), transfer)
        transfer.check(f"checkpoint store {self.url!r}: commit of step {step}")
        self._commit_and_advance(step, manifest, transfer)

    def _upload_all(self, step: int, src_dir: Path, manifest: Manifest, names: list[str], transfer: Transfer) -> None:
        folder = self._attempt_folder(step, manifest)

        def upload(name: str) -> None:
            transfer.check(f"checkpoint store {self.url!r}: upload of step {step}")
            self._upload(src_dir / name, self._name(folder + name), manifest.files[name], transfer)

        with self._failing_as(f"uploading step {step} (nothing committed)"):
            self._parallel(upload, names)

    def put_share(self, step: int, src_dir: Path, manifest: Manifest, transfer: Transfer | None = None) -> bool:
        """One node's part of a multi-node checkpoint (each node's disk holds only its own ranks'
        files): upload the manifest's files that src_dir holds into the attempt's folder, then commit
        once the folder holds every file. Each node lists after its own upload, so the last one to
        finish sees all the files and commits; a repeated commit of the same attempt is no conflict.
        True when the step is committed, False while other nodes' files are missing."""
        transfer = transfer or Transfer()
        folder = self._attempt_folder(step, manifest)
        mine = sorted(name for name in manifest.files if (src_dir / name).is_file())
        self._upload_all(step, src_dir, manifest, mine, transfer)
        with self._failing_as(f"listing step {step}"):
            present = {self._relative(b)[len(folder) :]: b.size for b in self._list(folder)}
        if any(present.get(name) != entry.size for name, entry in manifest.files.items()):
            return False
        self._commit_and_advance(step, manifest, transfer)
        return True

    def _attempt_folder(self, step: int, manifest: Manifest) -> str:
        attempt = manifest.attempt
        if manifest.step != step or not attempt or "/" in attempt or attempt in (".", ".."):
            raise StoreError(
                f"checkpoint store {self.url!r}: cannot put step {step} with a manifest for step "
                f"{manifest.step}, attempt {attempt!r} (needs a non-empty attempt without '/')"
            )
        return f"{step_dirname(step)}/{attempt}/"

    def _commit_and_advance(self, step: int, manifest: Manifest, transfer: Transfer) -> None:
        with self._failing_as(f"committing step {step}"):
            self._commit(step, manifest, self._retry.with_timeout(transfer.remaining(self._retry.timeout)))
        try:
            self._advance_latest(step)
        except _FAILURES as err:  # the checkpoint is committed; `latest` is only a hint
            log.warning(
                "checkpoint store %s: step %d committed but `latest` not updated: %s", self.url, step, err
            )

    def fetch(self, step: int, scratch: Path) -> Path:
        manifest = self.read_manifest(step)
        dest = Path(scratch) / step_dirname(step)
        root = dest.resolve()
        for name in manifest.files:
            if not (root / name).resolve().is_relative_to(root):
                raise CorruptCheckpoint(
                    self._gs(self._name(step_dirname(step), MANIFEST)), f"bad file name {name!r}"
                )
        if dest.exists():
            shutil.rmtree(dest)  # a partial download from an earlier try
        folder = f"{step_dirname(step)}/{manifest.attempt}/"
        with self._failing_as(f"downloading step {step}"):
            self._parallel(
                lambda name: self._download(self._name(folder + name), dest / name, manifest.files[name]),
                sorted(manifest.files),
            )
        return dest

    def delete(self, step: int) -> None:
        step_dir = step_dirname(step)
        with self._failing_as(f"deleting step {step}"):
            self._delete_blob(self._name(step_dir, MANIFEST))  # from here on the checkpoint does not exist
            self._parallel(self._delete_blob, [b.name for b in self._list(step_dir + "/")])

    def cleanup_uncommitted(self, older_than_s: float) -> list[str]:
        """Delete attempt folders that no manifest names and that nobody wrote to for older_than_s
        (which must exceed the longest upload, or a save still in flight would lose its files).
        Returns the removed folders as `step_XXXXXXXXX/<attempt>`; a step whose manifest cannot be
        read is left alone."""
        now = time.time()
        folders: dict[str, list[storage.Blob]] = defaultdict(list)
        committed = []
        with self._failing_as("listing for cleanup"):
            for blob in self._list("step_"):
                parts = self._relative(blob).split("/", 2)
                if not STEP_DIR.match(parts[0]) or len(parts) < 2:
                    continue
                if parts[1:] == [MANIFEST]:
                    committed.append(parts[0])
                elif len(parts) == 3:
                    folders[f"{parts[0]}/{parts[1]}"].append(blob)
        keep = set()
        for step_dir in committed:
            try:
                keep.add(f"{step_dir}/{self.read_manifest(int(step_dir[5:])).attempt}")
            except CorruptCheckpoint:
                keep.update(f for f in folders if f.startswith(step_dir + "/"))
        removed = []
        for folder, blobs in sorted(folders.items()):
            newest = max(b.updated.timestamp() for b in blobs)
            if folder not in keep and now - newest >= older_than_s:
                with self._failing_as(f"deleting {self._gs(self._name(folder))}"):
                    self._parallel(self._delete_blob, [b.name for b in blobs])
                removed.append(folder)
        return removed

    def quarantine(self, step: int, reason: dict) -> str:
        """Copy the manifest and the attempt's objects under quarantine/ with the reason, then delete
        the manifest (the step is uncommitted from here on) and the originals; `latest` follows."""
        step_dir = step_dirname(step)
        dest = f"{QUARANTINE}/{quarantine_name(step)}/"
        with self._failing_as(f"quarantining step {step}"):
            originals = list(self._list(step_dir + "/"))
            for blob in originals:
                rest = self._relative(blob)[len(step_dir) + 1 :]
                self.bucket.copy_blob(blob, self.bucket, self._name(dest + rest), retry=self._retry)
            self.bucket.blob(self._name(dest + REASON)).upload_from_string(
                json.dumps(reason, indent=1), content_type="application/json", retry=self._retry)
            self._delete_blob(self._name(step_dir, MANIFEST))
            self._parallel(self._delete_blob, [b.name for b in originals])
            current, generation = self._read_latest()
            if current == step:
                self._write_latest(max(self.committed_steps(), default=None), generation)
        return self._gs(self._name(dest))

    def quarantined(self) -> list[Quarantined]:
        entries: dict[str, dict] = {}
        with self._failing_as("listing quarantine"):
            for blob in self._list(QUARANTINE + "/"):
                name, _, rest = self._relative(blob)[len(QUARANTINE) + 1 :].partition("/")
                entries.setdefault(name, {})
                if rest == REASON:
                    try:
                        entries[name] = json.loads(blob.download_as_bytes(retry=self._retry))
                    except ValueError:
                        entries[name] = {}
        return [Quarantined(n, self._gs(self._name(QUARANTINE, n)) + "/", r) for n, r in sorted(entries.items())]

    def purge_quarantine(self) -> list[str]:
        gone = [q.name for q in self.quarantined()]
        with self._failing_as("purging quarantine"):
            self._parallel(self._delete_blob, [b.name for b in self._list(QUARANTINE + "/")])
        return gone

    def read_record(self, name: str) -> dict | None:
        blob_name = self._name(record_name(name))
        with self._failing_as(f"reading {self._gs(blob_name)}"):
            try:
                data = self.bucket.blob(blob_name).download_as_bytes(retry=self._retry)
            except api.NotFound:
                return None
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise StoreError(f"{self._gs(blob_name)}: not text") from None
        return parse_record(text, self._gs(blob_name))

    def write_record(self, name: str, record: dict) -> None:
        """One object write: GCS replaces an object atomically."""
        blob_name = self._name(record_name(name))
        with self._failing_as(f"writing {self._gs(blob_name)}"):
            self.bucket.blob(blob_name).upload_from_string(
                json.dumps(record, indent=1, sort_keys=True) + "\n", content_type="application/json",
                retry=self._retry)

    def delete_record(self, name: str) -> bool:
        blob_name = self._name(record_name(name))
        with self._failing_as(f"deleting {self._gs(blob_name)}"):
            try:
                self.bucket.blob(blob_name).delete(retry=self._retry)
            except api.NotFound:
                return False
        return True

    # ---- internals

    def _upload(self, path: Path, name: str, expected: FileEntry, transfer: Transfer) -> None:
        blob = self.bucket.blob(name, chunk_size=self.chunk_size)
        blob.crc32c = _b64(expected.crc32c)  # GCS rejects the object if the bytes don't match it
        left = transfer.remaining(self._retry.timeout)
        blob.upload_from_filename(str(path), checksum="crc32c", retry=self._retry.with_timeout(left),
                                  timeout=(min(left, 60.0), left))
        actual = _hex(blob.crc32c)  # what the server stored, checked here too (emulators don't enforce)
        if blob.size != expected.size or actual != expected.crc32c:
            raise StoreError(
                f"checkpoint store {self.url!r}: uploaded {self._gs(name)} has size {blob.size} and crc32c "
                f"{actual}, manifest says {expected.size} and {expected.crc32c}"
            )

    def _download(self, name: str, path: Path, expected: FileEntry) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            try:
                self.bucket.blob(name).download_to_file(writer, checksum=None, retry=self._retry)
            except api.NotFound:
                raise CorruptCheckpoint(self._gs(name), "missing object listed in the manifest") from None
        size, actual = path.stat().st_size, writer.crc.digest().hex()
        if size != expected.size:
            raise CorruptCheckpoint(self._gs(name), f"size {size} bytes, manifest says {expected.size}")
        if actual != expected.crc32c:
            raise CorruptCheckpoint(self._gs(name), f"crc32c {actual}, manifest says {expected.crc32c}")

    def _commit(self, step: int, manifest: Manifest, retry) -> None:
        """Create the manifest only if absent. A 412 means someone committed first, unless that
        someone is us: a retried write whose first try landed but whose answer got lost."""
        name = self._name(step_dirname(step), MANIFEST)
        try:
            self.bucket.blob(name).upload_from_string(
                manifest.to_json(), content_type="application/json", if_generation_match=0, retry=retry
            )
        except api.PreconditionFailed:
            try:
                winner = self.read_manifest(step).attempt
            except CorruptCheckpoint:
                winner = None
            if winner != manifest.attempt:
                raise CommitConflict(self.url, step, manifest.attempt, winner) from None

    def _read_latest(self) -> tuple[int | None, int]:
        """(step, generation): generation 0 when absent, step None when absent or malformed."""
        blob = self.bucket.blob(self._name(LATEST))
        try:
            data = blob.download_as_bytes(retry=self._retry)
        except api.NotFound:
            return None, 0
        try:
            return int(json.loads(data)["step"]), blob.generation
        except (ValueError, KeyError, TypeError):
            return None, blob.generation

    def _write_latest(self, step: int | None, generation: int) -> None:
        """Point `latest` at step (None: remove it), only if it is still at `generation`."""
        blob = self.bucket.blob(self._name(LATEST))
        try:
            if step is None:
                blob.delete(if_generation_match=generation or None, retry=self._retry)
            else:
                blob.upload_from_string(json.dumps({"step": step}), content_type="application/json",
                                        if_generation_match=generation, retry=self._retry)
        except (api.PreconditionFailed, api.NotFound):
            log.warning("checkpoint store %s: `latest` changed meanwhile; left as it is", self.url)

    def _advance_latest(self, step: int) -> None:
        """Move `latest` forward to step, never back: the write only lands if `latest` is still the
        version we read, so concurrent writers re-read instead of overwriting a newer step."""
        for _ in range(_LATEST_TRIES):
            current, generation = self._read_latest()
            if current is not None and current >= step:
                return
            try:
                self.bucket.blob(self._name(LATEST)).upload_from_string(
                    json.dumps({"step": step}),
                    content_type="application/json",
                    if_generation_match=generation,
                    retry=self._retry,
                )
                return
            except api.PreconditionFailed:
                continue
        log.warning("checkpoint store %s: `latest` kept changing; not moved to step %d", self.url, step)
