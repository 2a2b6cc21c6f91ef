"""The manifest: written last, it is what makes a checkpoint exist. It lists every file with its
size and CRC32C, so a restore can prove a checkpoint whole before trusting it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import google_crc32c

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint that fails verification; `where` names the file, the message says why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class FileEntry:
    size: int
    crc32c: str  # 8 hex digits


@dataclass
class Manifest:
    step: int
    files: dict[str, FileEntry]
    attempt: str = ""
    world_size: int = 1
    created: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)  # progress facts for listings (sample index, ...)
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def of_step(cls, data: bytes, step: int, where: str) -> Manifest:
        """A store's manifest of `step` from its bytes: text, well-formed, and for that step, or
        CorruptCheckpoint naming `where` (every store reads its manifests through this)."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise CorruptCheckpoint(where, "manifest is not text") from None
        manifest = cls.from_json(text, where)
        if manifest.step != step:
            raise CorruptCheckpoint(where, f"manifest is for step {manifest.step}, not {step}")
        return manifest

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            files = {name: FileEntry(int(e["size"]), str(e["crc32c"])) for name, e in raw["files"].items()}
            manifest = cls(
                step=int(raw["step"]),
                files=files,
                attempt=str(raw.get("attempt", "")),
                world_size=int(raw.get("world_size", 1)),
                created=float(raw.get("created", 0.0)),
                meta=dict(raw.get("meta", {})),
                version=int(raw.get("version", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptCheckpoint(where, f"malformed manifest ({type(err).__name__}: {err})") from None
        if manifest.version != FORMAT_VERSION:
            raise CorruptCheckpoint(where, f"manifest version {manifest.version}, expected {FORMAT_VERSION}")
        if not files:
            raise CorruptCheckpoint(where, "manifest lists no files")
        return manifest


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


def file_entry(path: Path) -> FileEntry:
    crc = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc.update(chunk)
    return FileEntry(size=path.stat().st_size, crc32c=crc.digest().hex())


def verify_local_files(directory: Path, manifest: Manifest) -> None:
    """Every listed file present, of the listed size and CRC32C; raises CorruptCheckpoint otherwise."""
    for name, expected in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(str(path), "missing file listed in the manifest")
        size = path.stat().st_size
        if size != expected.size:
            raise CorruptCheckpoint(str(path), f"size {size} bytes, manifest says {expected.size}")
        actual = file_entry(path).crc32c
        if actual != expected.crc32c:
            raise CorruptCheckpoint(str(path), f"crc32c {actual}, manifest says {expected.crc32c}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
