"""checkov over every synthesized topology: no failed check except the reviewed allowlist."""

from __future__ import annotations

import json
import subprocess

import pytest

from infra.settings import REPO

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
ALLOWLIST = REPO / "infra" / "checkov-allowlist.txt"


def allowlist() -> dict[str, str]:
    entries = {}
    for line in ALLOWLIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            check, _, reason = line.partition(" ")
            assert reason.strip(), f"{check} has no reason in {ALLOWLIST.name}"
            entries[check] = reason.strip()
    return entries


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov's venv is missing: run `make .venv-checkov` "
                    "(`make test` builds it first)")
def test_checkov_passes_except_the_allowlist(topologies, synth_root):
    scanned = synth_root / "topologies"
    assert {p.parent.parent.parent.name for p in scanned.glob("*/stacks/*/cdk.tf.json")} == set(topologies)
    result = subprocess.run([str(CHECKOV), "-d", str(scanned), "--framework", "terraform_json", "--skip-download",
                             "--output", "json", "--quiet"], capture_output=True, text=True, timeout=300)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, f"checkov scanned too little ({passed} passed checks): {result.stderr[-2000:]}"
    failed_ids = {c["check_id"] for c in failed}
    unexpected = sorted(f"{c['check_id']} {c['check_name']} on {c['resource']}" for c in failed
                        if c["check_id"] not in allowlist())
    assert not unexpected, "checks failed that infra/checkov-allowlist.txt does not list:\n" + "\n".join(unexpected)
    assert failed_ids == set(allowlist()), f"allowlisted but passing now (remove them): {set(allowlist()) - failed_ids}"
