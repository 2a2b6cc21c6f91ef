"""The release version digests what runs on a VM and nothing else: editing the local Spot cloud (the
simulator, harness/chaos/) publishes no new release and rolls no instance template; editing the
trainer or the job's config does. The wheel carries no simulator either."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from infra import release

REPO = release.REPO


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    """A copy of what the version reads, with release.REPO pointed at it."""
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("harness", "conf"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(release, "REPO", tmp_path)
    monkeypatch.setattr(release, "SIMULATOR", tmp_path / "harness" / "chaos")
    return tmp_path


def test_the_version_changes_with_the_trainer_or_the_config_and_not_with_the_simulator(tree):
    before = release.version()
    with open(tree / "harness" / "chaos" / "cloud.py", "a") as f:
        f.write("\n# an edit of the simulator\n")
    (tree / "harness" / "chaos" / "conf" / "chaos.yaml").write_text("mtbi_s: 1\n")
    assert release.version() == before, "the simulator is not part of the release"
    with open(tree / "harness" / "train.py", "a") as f:
        f.write("\n# an edit of the trainer\n")
    trained = release.version()
    assert trained != before
    with open(tree / "conf" / "optim" / "adamw.yaml", "a") as f:
        f.write("\n# an edit of the job's config\n")
    assert release.version() != trained


def test_the_wheel_holds_the_harness_without_the_simulator(tmp_path):
    names = zipfile.ZipFile(release.build_wheel(tmp_path)).namelist()
    assert "harness/train.py" in names and "harness/sweep/queue.py" in names
    assert not [n for n in names if n.startswith("harness/chaos/")]
