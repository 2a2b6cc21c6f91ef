"""What the user sees of their checkpoints:

    python -m harness.checkpoint list <store> [<store> ...]     every checkpoint: step, size, age, status,
                                                                and the quarantined ones with their reason
    python -m harness.checkpoint verify <store> [step]          full CRC32C check of one (default: newest)
    python -m harness.checkpoint purge-quarantine <store>       delete the quarantined checkpoints

A store is a local path or gs://bucket/prefix (`make checkpoints STORE=...`). Exit 1 if a verification fails.
Nothing here deletes a checkpoint except purge-quarantine, on request.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from harness.checkpoint.manifest import CorruptCheckpoint
from harness.checkpoint.store import Store, StoreError
from harness.checkpoint.tiers import open_store


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _status(store: Store, step: int, full: bool) -> tuple[str, int, float]:
    """('ok' or the reason it fails, bytes, created) for one checkpoint."""
    try:
        manifest = store.verify(step) if full else store.read_manifest(step)
        return "ok", manifest.total_bytes, manifest.created
    except (CorruptCheckpoint, StoreError, OSError) as err:
        return f"BAD: {err}", 0, 0.0


def list_stores(urls: Sequence[str], console: Console) -> int:
    bad = 0
    for url in urls:
        store = open_store(url)
        table = Table(title=url)
        for column in ("step", "size", "age", "status"):
            table.add_column(column, justify="right" if column != "status" else "left")
        for step in reversed(store.committed_steps()):
            status, size, created = _status(store, step, full=True)
            bad += status != "ok"
            table.add_row(str(step), f"{size / 1e6:.1f} MB", _age(time.time() - created) if created else "-", status)
        console.print(table)
        if quarantined := store.quarantined():  # plain lines: paths and reasons must not be cut
            console.print(f"{url}: {len(quarantined)} quarantined (kept until `purge-quarantine {url}`):",
                          markup=False, soft_wrap=True)
            for q in quarantined:
                r = q.reason
                console.print(f"  step {r.get('step', '?')} at {r.get('when', '-')}: "
                              f"{r.get('reason', '(no reason recorded)')}\n    kept in {q.where}",
                              markup=False, soft_wrap=True, highlight=False)
    return 1 if bad else 0


def purge_quarantine(url: str, console: Console) -> int:
    gone = open_store(url).purge_quarantine()
    console.print(f"{url}: removed {len(gone)} quarantined checkpoint(s)" + (": " + ", ".join(gone) if gone else ""))
    return 0


def verify(url: str, step: int | None, console: Console) -> int:
    store = open_store(url)
    steps = store.committed_steps()
    if not steps:
        console.print(f"{url}: no committed checkpoints")
        return 1
    step = steps[-1] if step is None else step
    if step not in steps:
        console.print(f"{url}: no committed checkpoint at step {step}; committed: {steps}")
        return 1
    status, size, _ = _status(store, step, full=True)
    console.print(f"{url} step {step}: {status} ({size / 1e6:.1f} MB)")
    return 0 if status == "ok" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list checkpoints of one or more stores").add_argument("stores", nargs="+")
    check = sub.add_parser("verify", help="verify one checkpoint (default: the newest)")
    check.add_argument("store")
    check.add_argument("step", nargs="?", type=int)
    sub.add_parser("purge-quarantine", help="delete a store's quarantined checkpoints").add_argument("store")
    args = parser.parse_args(argv)
    console = Console(width=200)
    try:
        if args.command == "list":
            return list_stores(args.stores, console)
        if args.command == "purge-quarantine":
            return purge_quarantine(args.store, console)
        return verify(args.store, args.step, console)
    except StoreError as err:
        console.print(f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
