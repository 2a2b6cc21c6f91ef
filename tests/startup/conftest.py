"""Fixtures for tests/startup: a fake metadata server and a fake VM (startup_vm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.startup.startup_vm import FakeMetadata, Vm


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.close()


@pytest.fixture
def vm(tmp_path: Path, metadata: FakeMetadata) -> Vm:
    return Vm(tmp_path, metadata)
