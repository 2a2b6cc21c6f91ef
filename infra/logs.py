"""The job's logs in Cloud Logging: what the VMs ship, with which labels, and `make logs`, which reads
them back. The one place that names the labels: the agent config the VMs get writes them, the filter
`make logs` sends reads them.

Writer: the Ops Agent on every VM (from the image, or from the release: `infra.logs.agent_package`).
startup.sh writes `agent_config()` (the instance attribute `spot-ops-agent-config`) to
/etc/google-cloud-ops-agent/config.yaml and restarts the agent. Its `systemd_journald` receiver reads
the whole journal; an `exclude_logs` processor keeps only the job's entries: the job's unit
(`spot-train.service` or `spot-rendezvous.service`, the trainer's or the store's output), systemd's
lines about that unit (exits, restarts, OOM kills), the guest agent's `google-startup-scripts.service`
and `google-shutdown-scripts.service` (startup.sh and shutdown.sh, with every command's output), and
the kernel's GPU (`NVRM: Xid`) and out-of-memory lines. A `modify_fields` processor sets the labels:

    spot_deployment  infra.name                      static, from the template
    spot_run         run.name                        static, from the template
    spot_role        master | worker | coordinator   static, from the template
    spot_vm          the instance name               each entry's journal field _HOSTNAME
    spot_incarnation the boot that wrote the entry   each entry's journal field _BOOT_ID

A Spot VM's incarnation is one boot: a preempted VM is recreated under the same name (the MIG), and
each boot runs startup.sh and the job's unit afresh, so _BOOT_ID changes exactly when the VM's life
does, on every entry, whoever wrote it (nothing has to write a label into the journal; an entry a boot
wrote before the agent shipped it keeps that boot's id). The trainer's own incarnations (a process
start of a rank, harness/telemetry/ledger.py) live inside a boot and are in the lines themselves. The
log's name is the receiver's, `LOG_ID` (projects/<project>/logs/spot_job). The built-in pipeline that
ships /var/log/syslog is turned off: rsyslog copies the same journal there, which would bill every
trainer line twice, without labels.

Reader: `python -m infra logs run.name=<run> [overrides] [--freshness 1d] [--limit N] [--role R] [--vm V]`
(`make logs`) runs `gcloud logging read` with a filter on the labels, newest first with `--limit`,
and prints the entries oldest first, one line each: time, VM, role, incarnation (the boot id's first
8 hex digits), source (train, rendezvous, startup, shutdown, systemd, kernel) and the message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from harness.config import ConfigError
from infra.settings import PLACEHOLDER_PROJECT, Settings

# The attribute startup.sh reads and writes to the agent's config file.
CONFIG_KEY = "spot-ops-agent-config"
LOG_ID = "spot_job"  # the receiver's id, which the Ops Agent makes the log's name
LABELS = ("spot_deployment", "spot_run", "spot_role", "spot_vm", "spot_incarnation")
UNITS = {"master": "spot-train.service", "worker": "spot-train.service", "coordinator": "spot-rendezvous.service"}
SCRIPT_UNITS = {"google-startup-scripts.service": "startup", "google-shutdown-scripts.service": "shutdown"}
KERNEL_LINES = "NVRM: Xid|Out of memory|oom-kill"  # GPU faults and the OOM killer: why a trainer died
ROLES = tuple(UNITS)
FRESHNESS = re.compile(r"(\d+[smhdw])+")  # gcloud's durations: 30m, 6h, 1d, 1h30m
SHORT_INCARNATION = 8


def _only_the_job(role: str) -> str:
    """The exclude_logs filter (Ops Agent filter syntax): everything that is not the job's."""
    unit = UNITS[role]
    keep = [f'jsonPayload._SYSTEMD_UNIT = "{unit}"', f'jsonPayload.UNIT = "{unit}"',
            *(f'jsonPayload._SYSTEMD_UNIT = "{u}"' for u in SCRIPT_UNITS),
            f'(jsonPayload._TRANSPORT = "kernel" AND jsonPayload.MESSAGE =~ "{KERNEL_LINES}")']
    return f"NOT ({' OR '.join(keep)})"


def agent_config(settings: Settings, role: str) -> str:
    """The Ops Agent config.yaml for a VM of `role` (merged by the agent with its built-in one)."""
    if role not in UNITS:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    config = {
        "logging": {
            "receivers": {LOG_ID: {"type": "systemd_journald"}},
            "processors": {
                "spot_only_the_job": {"type": "exclude_logs", "match_any": [_only_the_job(role)]},
                "spot_labels": {"type": "modify_fields", "fields": {
                    "labels.spot_deployment": {"static_value": settings.infra.name},
                    "labels.spot_run": {"static_value": settings.run_id},
                    "labels.spot_role": {"static_value": role},
                    "labels.spot_vm": {"copy_from": "jsonPayload._HOSTNAME"},
                    "labels.spot_incarnation": {"copy_from": "jsonPayload._BOOT_ID"},
                }},
            },
            "service": {"pipelines": {
                "default_pipeline": {"receivers": []},  # /var/log/syslog: the same journal again, unlabelled
                LOG_ID: {"receivers": [LOG_ID], "processors": ["spot_only_the_job", "spot_labels"]},
            }},
        },
    }
    header = (f"# Written by startup.sh from the instance attribute {CONFIG_KEY} (infra/logs.py): the job's\n"
              f"# journal entries to Cloud Logging, log {LOG_ID}, with the labels\n# {', '.join(LABELS)}.\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=1000)


# --- make logs ------------------------------------------------------------------------------------

def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_filter(settings: Settings, role: str | None = None, vm: str | None = None) -> str:
    """The Cloud Logging query for one run of one deployment, across its VMs and their incarnations."""
    parts = [f"logName={_quote(f'projects/{settings.infra.project}/logs/{LOG_ID}')}",
             f"labels.spot_deployment={_quote(settings.infra.name)}", f"labels.spot_run={_quote(settings.run_id)}"]
    if role:
        parts.append(f"labels.spot_role={_quote(role)}")
    if vm:
        parts.append(f"labels.spot_vm={_quote(vm)}")
    return " AND ".join(parts)


def read_command(gcloud: str, settings: Settings, freshness: str, limit: int, role: str | None = None,
                 vm: str | None = None) -> list[str]:
    """Newest first, so that `limit` keeps the latest entries (printed oldest first)."""
    return [gcloud, "logging", "read", log_filter(settings, role, vm), f"--project={settings.infra.project}",
            f"--freshness={freshness}", f"--limit={limit}", "--order=desc", "--format=json"]


def source(payload: dict[str, Any]) -> str:
    """Who wrote the entry, in a word."""
    unit = payload.get("_SYSTEMD_UNIT", "")
    if unit in SCRIPT_UNITS:
        return SCRIPT_UNITS[unit]
    if unit in UNITS.values():
        return unit.removeprefix("spot-").removesuffix(".service")
    if payload.get("_TRANSPORT") == "kernel":
        return "kernel"
    if payload.get("UNIT"):
        return "systemd"
    return str(payload.get("SYSLOG_IDENTIFIER") or unit or "?")


def message(payload: dict[str, Any]) -> str:
    """The journal's MESSAGE; journald stores one with control characters as a list of bytes."""
    text = payload.get("MESSAGE", payload.get("message", ""))
    if isinstance(text, list):
        text = bytes(b for b in text if isinstance(b, int) and 0 <= b < 256).decode("utf-8", "replace")
    return str(text).rstrip("\n").replace("\r", "\\r").replace("\n", "\\n")


def line(entry: dict[str, Any]) -> str:
    labels = entry.get("labels", {})
    payload = entry.get("jsonPayload") or {}
    vm = labels.get("spot_vm") or labels.get("compute.googleapis.com/resource_name", "?")
    incarnation = labels.get("spot_incarnation", "?")[:SHORT_INCARNATION]
    stamp = entry.get("timestamp", "?")
    return f"{stamp} {vm} {labels.get('spot_role', '?')} {incarnation} {source(payload)}: {message(payload)}"


def check(settings: Settings, overrides: Sequence[str], freshness: str, limit: int) -> None:
    """ConfigError naming the key or option when the query would not be for one real run."""
    if not any(o.split("=", 1)[0].lstrip("+~") == "run.name" for o in overrides):
        raise ConfigError("run.name is not given: make logs prints the logs of one run; name it, e.g. "
                          'make logs ARGS="run.name=exp1 infra.project=my-proj"')
    if settings.infra.project == PLACEHOLDER_PROJECT:
        raise ConfigError(f"infra.project={settings.infra.project!r} is the placeholder; set "
                          "infra.project=<the project the run was deployed to>")
    if not FRESHNESS.fullmatch(freshness):
        raise ConfigError(f"--freshness={freshness!r} is not a duration; use e.g. 30m, 6h, 1d or 1h30m")
    if limit < 1:
        raise ConfigError(f"--limit={limit} must be >= 1")


def show(gcloud: str, settings: Settings, freshness: str, limit: int, role: str | None = None,
         vm: str | None = None, out: TextIO = sys.stdout) -> int:
    """Print the run's entries oldest first; returns how many. CalledProcessError when gcloud fails
    (its own message is on stderr)."""
    cmd = read_command(gcloud, settings, freshness, limit, role, vm)
    found = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    try:
        entries = json.loads(found.stdout or "[]")
    except ValueError as err:
        raise ConfigError(f"gcloud logging read printed no JSON ({err}): {found.stdout[:200]!r}") from None
    entries.reverse()  # gcloud's order is the service's, by time: newest first
    for entry in entries:
        print(line(entry), file=out)
    if not entries:
        print(f"no entries in the last {freshness} for {log_filter(settings, role, vm)} (project "
              f"{settings.infra.project}): a VM ships its job's journal once the Ops Agent runs (startup.sh "
              "logs `ops agent: ...` on its serial console); try a longer --freshness", file=sys.stderr)
    elif len(entries) == limit:
        print(f"(the newest {limit} entries; --limit shows more)", file=sys.stderr)
    return len(entries)
