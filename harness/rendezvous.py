"""The job's rendezvous store: `python -m harness.rendezvous --port 29400`, on the coordinator or master.

torchrun's c10d rendezvous keeps its state in a TCPStore at `--rdzv-endpoint`. When one of the
training agents hosts that store, the rendezvous dies with that agent's VM; hosted here, on a VM that
is never preempted, it outlives every Spot preemption, and agents (started with the endpoint's host
not their own, or with `--rdzv-conf is_host=False`) only ever connect to it as clients.
Runs until SIGTERM or SIGINT; exits 0 then, 1 when the port cannot be bound.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta

from torch.distributed import TCPStore


def serve(port: int, host: str = "0.0.0.0") -> TCPStore:
    """A TCPStore server on `port` that accepts any number of clients (multi-tenant, as c10d expects)."""
    return TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                    timeout=timedelta(seconds=60))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.rendezvous", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the port of launch.rdzv_endpoint")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    try:
        store = serve(args.port, args.host)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"rendezvous: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"rendezvous: store listening on {args.host}:{store.port}", flush=True)
    while not stop.wait(3600):
        pass
    print("rendezvous: stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
