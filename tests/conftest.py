"""Shared fixtures: uninterrupted reference runs, computed once per session and configuration."""

from __future__ import annotations

import pytest

from tests import runs
from tests.gcs_emulator import fake_gcs, shared_fake_gcs  # noqa: F401 - fixtures for every test module


@pytest.fixture(scope="session")
def reference_sha(tmp_path_factory):
    """model_sha256 of an uninterrupted run: reference_sha(nproc, overrides)."""
    cache: dict[tuple, str] = {}

    def get(nproc: int, overrides: list[str]) -> str:
        key = (nproc, tuple(overrides))
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("reference")
            log = run_dir / "log.txt"
            assert runs.run(nproc, [*overrides, f"run.dir={run_dir}"], log) == 0, runs.tail(log)
            cache[key] = runs.summary(run_dir)["model_sha256"]
        return cache[key]

    return get
