"""Running Terraform (or OpenTofu) in the synthesized stack directory, after checking that it can
work at all: a binary on PATH and Google credentials, before anything is synthesized or built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

BINARIES = ("terraform", "tofu")
INSTALL = ("neither `terraform` (>= 1.5) nor `tofu` is on PATH: install Terraform "
           "(https://developer.hashicorp.com/terraform/install) or OpenTofu (https://opentofu.org/docs/intro/install/)")
NO_CREDENTIALS = ("no Google Cloud credentials: run `gcloud auth application-default login` "
                  "(or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file)")


class PreflightError(RuntimeError):
    """What is missing before Terraform can run, and how to get it."""


def _adc_file(env: Mapping[str, str]) -> Path:
    config = env.get("CLOUDSDK_CONFIG") or str(Path(env.get("HOME", "~")).expanduser() / ".config" / "gcloud")
    return Path(config) / "application_default_credentials.json"


def has_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """Credentials the google provider and client libraries would find: a key file, an access token,
    or the application-default credentials that `gcloud auth application-default login` writes."""
    key_file = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        return Path(key_file).is_file()
    return bool(env.get("GOOGLE_CREDENTIALS") or env.get("GOOGLE_OAUTH_ACCESS_TOKEN")) or _adc_file(env).is_file()


def preflight() -> str:
    """The Terraform-compatible binary to use; PreflightError naming what to install or run."""
    binary = next((path for name in BINARIES if (path := shutil.which(name))), None)
    if binary is None:
        raise PreflightError(INSTALL)
    if not has_credentials():
        raise PreflightError(NO_CREDENTIALS)
    return binary


def run(binary: str, stack_dir: Path, *args: str) -> None:
    """`<binary> <args>` in the stack directory, attached to this terminal; CalledProcessError on failure."""
    print(f"+ {Path(binary).name} {' '.join(args)}  (in {stack_dir})", flush=True)
    subprocess.run([binary, *args], cwd=stack_dir, check=True, env={**os.environ, "TF_IN_AUTOMATION": "1"})


def targets(stack_dir: Path, construct_ids: Sequence[str]) -> list[str]:
    """`-target=<type>.<name>` for every resource the synthesized stack holds under these constructs."""
    tf = json.loads((stack_dir / "cdk.tf.json").read_text())
    prefixes = tuple(f"{stack_dir.name}/{c}/" for c in construct_ids)
    return [f"-target={kind}.{name}" for kind, resources in sorted(tf["resource"].items())
            for name, body in sorted(resources.items()) if body["//"]["metadata"]["path"].startswith(prefixes)]


def plan_or_destroy(binary: str, stack_dir: Path, command: str, yes: bool) -> None:
    """`terraform init`, then `plan` or `destroy` (-auto-approve with `yes`) of a synthesized stack."""
    run(binary, stack_dir, "init", "-input=false")
    if command == "plan":
        run(binary, stack_dir, "plan", "-input=false")
    else:
        run(binary, stack_dir, "destroy", *(["-auto-approve"] if yes else []))
