"""Synthesized stacks, shared by the infra tests. Importing the provider bindings takes seconds and
hundreds of MB, so it happens once per session; each synth after that takes milliseconds."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra import release
from infra import settings as infra_settings
from infra.settings import REPO, Settings
from tests.gcs_emulator import fake_gcs  # noqa: F401  (the session's GCS emulator, for the deploy test)

TOPOLOGIES = ("hybrid", "all_spot", "on_demand")
RELEASE = "0.0.0-test"
PROJECT = "test-project-123"
# The release as the tests deploy it: torch comes with the image (its CUDA build is gigabytes), so the
# wheelhouse built here holds everything else.
TORCH_IN_IMAGE = ("infra.image.torch=2.13.0", "infra.wheelhouse.torch=false")
REAL_STARTUP = REPO / "startup"


def real_startup_present() -> bool:
    return (REAL_STARTUP / "startup.sh").is_file() and (REAL_STARTUP / "shutdown.sh").is_file()


@dataclass
class Synthesized:
    settings: Settings
    stack_dir: Path
    tf: dict[str, Any]

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.tf["resource"].get(kind, {})

    def one(self, kind: str, path_suffix: str = "") -> dict[str, Any]:
        """The single resource of `kind` whose construct path ends with path_suffix."""
        found = [r for r in self.resources(kind).values() if r["//"]["metadata"]["path"].endswith(path_suffix)]
        assert len(found) == 1, f"{len(found)} {kind} resources end with {path_suffix!r}"
        return found[0]

    def template(self, role: str) -> dict[str, Any]:
        return self.one("google_compute_instance_template", f"/{role}-template")

    def ref(self, body: dict[str, Any], kind: str) -> str:
        """The Terraform name of the resource of `kind` that `body` is (for matching references)."""
        for name, other in self.resources(kind).items():
            if other is body:
                return f"{kind}.{name}"
        raise KeyError(kind)


@pytest.fixture(scope="session")
def startup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's startup/ when its scripts exist; otherwise stand-ins with Terraform-looking
    sequences, so the escaping is exercised either way."""
    if real_startup_present():
        return REAL_STARTUP
    folder = tmp_path_factory.mktemp("startup")
    for name in ("startup.sh", "shutdown.sh"):
        (folder / name).write_text('#!/usr/bin/env bash\necho "${HOME}" %{x} $${y}\n')
    return folder


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth(synth_root: Path, startup_dir: Path) -> Callable[..., Synthesized]:
    """synth(*overrides, outdir=None): load the settings exactly as `python -m infra` does and synthesize."""
    from infra import stacks

    count = iter(range(10_000))

    def run(*overrides: str, outdir: Path | None = None) -> Synthesized:
        outdir = outdir or synth_root / f"extra-{next(count)}"
        s = infra_settings.load([f"infra.project={PROJECT}", f"infra.outdir={outdir}",
                                 f"infra.startup_dir={startup_dir}", *overrides])
        stack_dir = stacks.synth(s, RELEASE)
        return Synthesized(s, stack_dir, json.loads((stack_dir / "cdk.tf.json").read_text()))

    return run


@pytest.fixture(scope="session")
def topologies(synth: Callable[..., Synthesized], synth_root: Path) -> dict[str, Synthesized]:
    """Each topology with the defaults, under <synth_root>/topologies/ (what checkov scans)."""
    return {t: synth(f"topology={t}", outdir=synth_root / "topologies" / t) for t in TOPOLOGIES}


@pytest.fixture(scope="session")
def wheelhouse_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel cache (infra.wheelhouse.cache_dir) for the whole run, shared by the xdist workers: the
    first to ask fills it (a download of about 45 s), later builds resolve from it (about 5 s), as a
    second deploy does."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's folder, above each worker's own
    cache = root / "wheelhouse"
    with open(root / "wheelhouse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / ".filled").is_file():
            release.build_wheelhouse(infra_settings.load(
                [f"infra.project={PROJECT}", *TORCH_IN_IMAGE, f"infra.wheelhouse.cache_dir={cache}"]))
            (cache / ".filled").touch()
    return cache
