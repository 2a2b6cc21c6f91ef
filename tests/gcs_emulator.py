"""A real GCS emulator for tests, in or outside pytest: the local Spot cloud's fake-gcs-server
(harness/chaos/fake_gcs.py), with a restart for outage tests and the STORAGE_EMULATOR_HOST plumbing.

    with running_fake_gcs() as gcs:          # sets STORAGE_EMULATOR_HOST while running
        gcs.make_bucket("ckpt")
        ... GCSStore("gs://ckpt/run") or subprocesses inheriting the environment ...

In pytest, use the session-scoped fixture `fake_gcs` (registered in tests/conftest.py). Don't stop or
restart that shared server; take a private one from running_fake_gcs().

The server keeps objects in memory: `restart()` (same port) loses every object. Buckets made with
make_bucket() come back empty on restart, and before the server answers, because they are also
created as folders in the `-data` seed directory it loads at startup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from harness.chaos.fake_gcs import FakeGCSServer


class FakeGCS(FakeGCSServer):
    def restart(self) -> None:
        """Stop and start on the same port: objects are gone, make_bucket() buckets exist again (empty)."""
        self.stop()
        self.start()


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
def shared_fake_gcs() -> Iterator[FakeGCS]:
    with running_fake_gcs() as server:
        yield server


@pytest.fixture
def fake_gcs(shared_fake_gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> FakeGCS:
    """One emulator for the whole test session, alive and named by STORAGE_EMULATOR_HOST for each test
    (a server that died meanwhile is restarted: its objects are gone, which no test relies on). Shared:
    use a fresh bucket or prefix per test, and never stop or restart it (use running_fake_gcs() for that)."""
    if shared_fake_gcs._proc is None or shared_fake_gcs._proc.poll() is not None:
        shared_fake_gcs.restart()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", shared_fake_gcs.host)
    return shared_fake_gcs
