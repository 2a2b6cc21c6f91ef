"""gs:// token files copied once per VM into a local cache (`data.cache_dir`), for memory-mapping.

`cached(files, cache_dir, ...)` returns a local path per gs:// URL, in order, holding exactly the
object's bytes. Its contract:

- Verified: a download's CRC32C must match the one in the object's metadata (GCS computed it on
  upload); a copy found in the cache is read through and checked against it again (once per node and
  torchrun launch, see below; at every call outside torchrun), and fetched again when it differs (a
  corrupt or stale copy). A download that fails its check is fetched again once before it is an error.
- Parallel and resumable: an object is fetched in ranged reads of `chunk_bytes` (on `threads` threads,
  all files' chunks in one pool) into `<file>.part`, and each chunk is recorded in `<file>.chunks`
  once it is on disk. A process killed mid-download (a preemption, a crash) leaves both behind; the
  next one fetches only the chunks that are not recorded, if the object's generation and the chunk
  size are still those of the record.
- One process per node fills the cache: whoever holds an exclusive flock on `<cache_dir>/.lock`
  (the kernel drops it when its holder dies). The others wait for the lock and give up with a
  TimeoutError naming data.download_stall_s when the holder has made no progress (`.progress` not
  touched) for `stall_s`. The holder stamps `<cache_dir>/.verified` with its torchrun launch (agent and
  restart count) and what it verified, so the other ranks of that launch skip the read-through.
- Bad input fails before anything is downloaded, with a ConfigError naming the key: a URL that is not
  gs://bucket/object, a missing object, a size that is not a whole number of uint16 tokens, a cache
  dir that cannot be made or that lacks room for what is left to fetch.

On a VM the launcher fills the cache before torchrun starts (harness/launch.py `prefetch_data`), so a
slow download delays only that node's rendezvous, never a collective with a timeout; the trainers
then find the copies and verify them. A trainer run without the launcher fills it while building its
dataset, after the process group is up.

Layout: `<cache_dir>/<bucket>/<object name>`. The client is the emulator's (anonymous) when
STORAGE_EMULATOR_HOST is set, else the default credentials' (a VM's service account).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from harness.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "gs://"
MiB = 1 << 20
LOCK, PROGRESS, VERIFIED = ".lock", ".progress", ".verified"
_RETRY = DEFAULT_RETRY.with_timeout(120.0).with_delay(initial=0.25, maximum=8.0, multiplier=2.0)
_READ = 8 * MiB  # the read-through's block, and how often it shows progress
_POLL_S = 0.25


class CorruptDownload(RuntimeError):
    """A fetched object's bytes do not match the CRC32C in its metadata, twice."""


@dataclass(frozen=True)
class Remote:
    """One gs:// file of the data config, with what its metadata says."""

    key: str  # the setting that names it: data.path or data.paths[i]
    url: str
    bucket: str
    name: str
    size: int = 0
    crc32c: str = ""  # base64 of the big-endian CRC32C, as GCS reports it
    generation: int = 0

    def local(self, cache_dir: Path) -> Path:
        return cache_dir / self.bucket / self.name


@dataclass
class Fill:
    """What `cached` returns: the local copies, and what it did to get them (bytes)."""

    paths: list[Path] = field(default_factory=list)  # one per file asked for, in order
    total: int = 0  # the files' size (each distinct URL once)
    fetched: int = 0  # downloaded by this call
    resumed: int = 0  # left on disk by a download that was killed, and kept
    verified: int = 0  # found in the cache and checked good
    refetched: tuple[str, ...] = ()  # URLs whose cached copy failed its check
    verified_by_launch: bool = False  # another process of this torchrun launch checked them all: nothing done


def cached(files: list[tuple[str, str]], cache_dir: Path, threads: int = 8, chunk_bytes: int = 32 * MiB,
           stall_s: float = 600.0) -> Fill:
    """Local copies of `files` ((key, gs:// URL) pairs), in order; see the module docstring."""
    remotes = [parse(key, url) for key, url in files]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"data.cache_dir={str(cache_dir)!r}: cannot be created ({err.strerror})") from None
    with _node_lock(cache_dir, stall_s) as beat:
        token = _launch_token()
        if token and _stamped(cache_dir, token, remotes):
            log.info("data: %d gs:// file(s) in %s, verified by another process of this launch", len(remotes),
                     cache_dir)
            return Fill([r.local(cache_dir) for r in remotes], verified_by_launch=True)
        client = _client()
        with ThreadPoolExecutor(threads, thread_name_prefix="data-fetch") as pool:
            remotes = list(pool.map(lambda r: _with_metadata(client, r), remotes))
            unique = list({r.url: r for r in remotes}.values())  # a shard may be listed twice
            fill = _fill(client, unique, cache_dir, chunk_bytes, pool, beat)
        _stamp(cache_dir, token, remotes)
    log.info("data: %d gs:// file(s), %s in %s: %s fetched (%s resumed from an interrupted download), %s "
             "verified in the cache%s", len(remotes), human(fill.total), cache_dir, human(fill.fetched),
             human(fill.resumed), human(fill.verified),
             f"; fetched again (corrupt or stale): {', '.join(fill.refetched)}" if fill.refetched else "")
    fill.paths = [r.local(cache_dir) for r in remotes]
    return fill


def human(n: int) -> str:
    """`n` bytes for people: 812 B, 7.8 KiB, 1.5 GiB."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def parse(key: str, url: str) -> Remote:
    bucket, _, name = url[len(PREFIX):].partition("/") if url.startswith(PREFIX) else ("", "", "")
    if not bucket or not name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ConfigError(f"{key}={url!r} is not a gs:// file URL; use gs://bucket/path/to/file.bin")
    return Remote(key, url, bucket, name)


def _client() -> storage.Client:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def _with_metadata(client: storage.Client, r: Remote) -> Remote:
    blob = client.bucket(r.bucket).get_blob(r.name, retry=_RETRY)
    if blob is None:
        raise ConfigError(f"{r.key}={r.url!r}: no such object")
    if blob.size % 2:
        raise ConfigError(f"{r.key}={r.url!r}: {blob.size} bytes, not a whole number of uint16 tokens")
    if not blob.crc32c:
        raise ConfigError(f"{r.key}={r.url!r}: the object's metadata has no crc32c to verify a copy against")
    return Remote(r.key, r.url, r.bucket, r.name, blob.size, blob.crc32c, blob.generation)


# ---- filling the cache


@dataclass
class _Download:
    """One object being fetched: its `.part` file and the record of the chunks already in it."""

    remote: Remote
    part: Path
    record: Path
    chunk: int
    done: set[int]

    @property
    def chunks(self) -> int:
        return -(-self.remote.size // self.chunk)

    def span(self, k: int) -> tuple[int, int]:
        return k * self.chunk, min((k + 1) * self.chunk, self.remote.size)

    def left(self) -> int:
        return sum(end - start for start, end in map(self.span, set(range(self.chunks)) - self.done))

    def start(self) -> None:
        """Begin from nothing: an empty `.part` of the object's size (sparse, so it takes room as chunks
        arrive) and a record with only its header."""
        self.done = set()
        self.part.parent.mkdir(parents=True, exist_ok=True)
        with open(self.part, "wb") as f:
            f.truncate(self.remote.size)
        self.record.write_text(json.dumps(_header(self.remote, self.chunk)) + "\n")


def _fill(client: storage.Client, remotes: list[Remote], cache_dir: Path, chunk: int, pool: ThreadPoolExecutor,
          beat: Callable[[], None]) -> Fill:
    fill = Fill(total=sum(r.size for r in remotes))
    present = [r for r in remotes if _size(r.local(cache_dir)) is not None]

    def good_copy(r: Remote) -> bool:
        return _size(r.local(cache_dir)) == r.size and _crc32c(r.local(cache_dir), beat) == r.crc32c

    good = dict(zip(present, pool.map(good_copy, present), strict=True))
    fill.verified = sum(r.size for r, ok in good.items() if ok)
    fill.refetched = tuple(r.url for r, ok in good.items() if not ok)
    for r, ok in good.items():
        if not ok:
            log.warning("data: the cached copy of %s does not match the object's crc32c: fetching it again", r.url)
            r.local(cache_dir).unlink()
    missing = [r for r in remotes if not good.get(r)]
    downloads = [_resume(r, r.local(cache_dir), chunk) for r in missing]
    fill.resumed = sum(r.size - d.left() for r, d in zip(missing, downloads, strict=True))
    left = sum(d.left() for d in downloads)
    free = shutil.disk_usage(cache_dir).free
    if left > free:
        raise ConfigError(f"data.cache_dir={str(cache_dir)!r}: {human(left)} left to fetch for data.path/"
                          f"data.paths, only {human(free)} free there; point data.cache_dir at a disk with room")
    for d in downloads:
        if not d.done:
            d.start()
    for _ in range(2):
        fill.fetched += sum(d.left() for d in downloads)
        _fetch_chunks(client, downloads, pool, beat)
        checks = list(pool.map(lambda d: _crc32c(d.part, beat) == d.remote.crc32c, downloads))
        for d, ok in zip(downloads, checks, strict=True):
            if ok:
                os.replace(d.part, d.remote.local(cache_dir))
                d.record.unlink()
        downloads = [d for d, ok in zip(downloads, checks, strict=True) if not ok]
        if not downloads:
            return fill
        for d in downloads:
            d.start()
        log.warning("data: %s failed its crc32c check after downloading: fetching it again",
                    ", ".join(d.remote.url for d in downloads))
    raise CorruptDownload(f"{', '.join(d.remote.url for d in downloads)}: downloaded twice, and twice the bytes did "
                          "not match the object's crc32c; is the object being rewritten?")


def _header(r: Remote, chunk: int) -> dict[str, int]:
    return {"generation": r.generation, "size": r.size, "chunk": chunk}


def _resume(r: Remote, dest: Path, chunk: int) -> _Download:
    """The download of `r` that an earlier process left, if of this generation and chunk size; else one with
    no chunks done (nothing is written here: `start` does that, once there is room)."""
    part, record = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".chunks")
    try:
        first, *rest = record.read_text().split("\n")
        if json.loads(first) == _header(r, chunk) and _size(part) == r.size:
            # Only whole lines count: a process killed while writing one leaves it without its newline.
            return _Download(r, part, record, chunk, {int(line) for line in rest[:-1] if line.isdigit()})
    except (OSError, ValueError):
        pass
    return _Download(r, part, record, chunk, set())


def _fetch_chunks(client: storage.Client, downloads: list[_Download], pool: ThreadPoolExecutor,
                  beat: Callable[[], None]) -> None:
    recording = threading.Lock()

    def fetch(d: _Download, k: int) -> None:
        start, end = d.span(k)
        blob = client.bucket(d.remote.bucket).blob(d.remote.name, generation=d.remote.generation)
        with open(d.part, "r+b") as f:
            f.seek(start)
            blob.download_to_file(f, start=start, end=end - 1, raw_download=True, checksum=None, retry=_RETRY)
            if f.tell() != end:
                raise OSError(f"{d.remote.url}: bytes {start}..{end} came back as {f.tell() - start} bytes")
            f.flush()
            os.fsync(f.fileno())
        with recording, open(d.record, "a") as rec:  # recorded only once the chunk is on disk
            rec.write(f"{k}\n")
            rec.flush()
            os.fsync(rec.fileno())
        beat()

    futures = [pool.submit(fetch, d, k) for d in downloads for k in range(d.chunks) if k not in d.done]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:  # the chunks not started yet: the error stops the download now
            future.cancel()
        raise


def _crc32c(path: Path, beat: Callable[[], None]) -> str:
    crc = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            crc.update(block)
            beat()
    return base64.b64encode(crc.digest()).decode()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


# ---- one process per node


@contextmanager
def _node_lock(cache_dir: Path, stall_s: float) -> Iterator[Callable[[], None]]:
    """Hold `<cache_dir>/.lock`; yields `beat`, which shows waiters that the holder makes progress."""
    progress = cache_dir / PROGRESS

    def beat() -> None:
        progress.touch()

    fd = os.open(cache_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waiting_since = time.time()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                quiet = time.time() - max(waiting_since, progress.stat().st_mtime if progress.exists() else 0)
                if quiet > stall_s:
                    raise TimeoutError(
                        f"data.cache_dir={str(cache_dir)!r}: another process on this node holds {LOCK} and has "
                        f"made no progress filling the cache for {quiet:.0f}s (data.download_stall_s={stall_s:g}); "
                        "raise data.download_stall_s, or find that process") from None
                time.sleep(_POLL_S)
        beat()
        yield beat
    finally:
        os.close(fd)  # releases the lock


def _launch_token() -> str | None:
    """This process's torchrun launch: its agent (the parent, with the parent's start time, so a reused
    pid is another launch) and the agent's restart count; None outside torchrun."""
    if "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{parent}-{started}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _stamp(cache_dir: Path, token: str | None, remotes: list[Remote]) -> None:
    if token is None:
        return
    tmp = cache_dir / f"{VERIFIED}.{os.getpid()}"
    tmp.write_text(json.dumps({"launch": token, "files": {r.url: r.size for r in remotes}}))
    os.replace(tmp, cache_dir / VERIFIED)


def _stamped(cache_dir: Path, token: str, remotes: list[Remote]) -> bool:
    """True if this launch's holder verified every one of `remotes` (and the copies are still there)."""
    try:
        stamp = json.loads((cache_dir / VERIFIED).read_text())
    except (OSError, ValueError):
        return False
    files = stamp.get("files", {})
    return stamp.get("launch") == token and all(
        r.url in files and _size(r.local(cache_dir)) == files[r.url] for r in remotes)
