"""DCP's FileSystemWriter, checksumming as it writes: each file's size and CRC32C come out of the
write itself, so a commit needs no read-back pass over what it just wrote.

DCP writes every file sequentially through `fs.create_stream(path, "wb")` (tensors via torch.save,
which only appends; the metadata via pickle into a temp file it then renames), and fsyncs each file
once when `sync_files` is set. The stream handed to DCP is the real file behind a thin wrapper that
folds every written buffer into a CRC32C; `entries` maps each finished file's name to its FileEntry,
the manifest's record of it.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import numpy as np
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from harness.checkpoint.manifest import FileEntry


class _ChecksummingStream(io.RawIOBase):
    """Writes through to `raw`, counting bytes and extending a CRC32C; everything else is raw's."""

    def __init__(self, raw: io.BufferedWriter):
        super().__init__()
        self.raw = raw
        self.crc = google_crc32c.Checksum()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001 - any bytes-like object
        view = memoryview(b).cast("B")
        written = self.raw.write(view)
        self.crc.update(np.frombuffer(view, dtype=np.uint8)[:written])  # google_crc32c reads an array in place
        self.size += written
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        if not self.raw.closed:
            self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _ChecksummingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()  # DCP writes files from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _ChecksummingStream(raw)  # type: ignore[arg-type]
            yield stream
        with self._lock:
            self.entries[Path(path).name] = FileEntry(size=stream.size, crc32c=stream.crc.digest().hex())

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            if (entry := self.entries.pop(Path(path).name, None)) is not None:
                self.entries[Path(new_path).name] = entry


class ChecksummingWriter(FileSystemWriter):
    """A FileSystemWriter whose `entries` are the size and CRC32C of every file this rank wrote."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:  # noqa: ANN003 - FileSystemWriter's
        super().__init__(path, **kwargs)
        self.fs = _ChecksummingFileSystem()

    @property
    def entries(self) -> dict[str, FileEntry]:
        return dict(self.fs.entries)
