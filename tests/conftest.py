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


# xdist's loadfile hands each worker whole files, two queued at a time; the Makefile turns off its
# reordering by test count, so that the longest files go first and no worker starts one near the end
# while the other idles. Worker-seconds measured on the 2-core CI machine; the rest keep their order.
LONGEST_FIRST = ("test_engine_e2e.py", "test_exactness.py", "preemption/test_preemption.py",
                 "models/test_hf_models.py", "test_elastic.py", "infra/test_infra_deploy.py",
                 "checkpoint/test_checkpoint.py", "sweep/test_sweep.py", "test_fsdp.py",
                 "telemetry/test_telemetry_e2e.py", "test_survivors.py", "startup/test_startup_sh.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
