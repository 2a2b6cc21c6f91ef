"""The job's rendezvous store: `python -m harness.rendezvous --port 29400 [--run-id RUN]`, on the
coordinator or master.

torchrun's c10d rendezvous keeps its state in a TCPStore at `--rdzv-endpoint`. When one of the
training agents hosts that store, the rendezvous dies with that agent's VM; hosted here, on a VM that
is never preempted, it outlives every Spot preemption, and agents (started with the endpoint's host
not their own, or with `--rdzv-conf is_host=False`) only ever connect to it as clients.

A rendezvous that always reopens: torchrun's agent closes the rendezvous of its run id for good when
its workers fail (`launch_agent`'s `finally: rdzv_handler.shutdown()`; only a signal skips it), and
after a preemption every worker exits 75, so each preemption used to leave the store refusing every
later join with RendezvousClosedError. With `--run-id`, this process watches that run's state key
and replaces a closed state with a fresh one one round later (later round: no stale per-round keys
such as MASTER_ADDR are reused), so the next nodes to come up form the next round. Chosen over a
per-incarnation rendezvous id, which every node would first have to agree on through another store.
Runs until SIGTERM or SIGINT; exits 0 then, 1 when the port cannot be bound.
"""

from __future__ import annotations

import argparse
import io
import pickle
import signal
import sys
import threading
from base64 import b64decode, b64encode
from datetime import timedelta

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

WATCH_S = 1.0
_STATE_CLASSES = {
    ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_RendezvousState"),
    ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_NodeDesc"),
    ("datetime", "datetime"),
    ("datetime", "timezone"),
    ("datetime", "timedelta"),
}


def serve(port: int, host: str = "0.0.0.0") -> TCPStore:
    """A TCPStore server on `port` that accepts any number of clients (multi-tenant, as c10d expects)."""
    return TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                    timeout=timedelta(seconds=60))


class _StateUnpickler(pickle.Unpickler):
    """The rendezvous state is written by any client of the store: build torch's state classes only."""

    def find_class(self, module: str, name: str):
        if (module, name) in _STATE_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a rendezvous state")


def state_key(run_id: str) -> str:
    """The key torchrun's C10dRendezvousBackend keeps run `run_id`'s state under (its --rdzv-id)."""
    from harness.config import rdzv_id

    return f"torch.rendezvous.{rdzv_id(run_id)}"


def reopen_if_closed(store: TCPStore, run_id: str) -> int | None:
    """If the run's rendezvous is closed, replace it (compare-and-set) with a fresh state at the next
    round; returns that round, else None."""
    key = state_key(run_id)
    if not store.check([key]):
        return None
    raw = store.get(key)
    if raw == c10d_rendezvous_backend.C10dRendezvousBackend._NULL_SENTINEL.encode():
        return None
    state = _StateUnpickler(io.BytesIO(b64decode(raw))).load()
    if not state.closed:
        return None
    fresh = dynamic_rendezvous._RendezvousState()
    fresh.round = state.round + 1
    store.compare_set(key, raw.decode(), b64encode(pickle.dumps(fresh)).decode())
    return fresh.round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.rendezvous", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the port of launch.rdzv_endpoint")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--run-id", help="torchrun's --rdzv-id (run.name): reopen its rendezvous when closed")
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
    reported = ""
    while not stop.wait(WATCH_S if args.run_id else 3600):
        if args.run_id:
            try:
                if (round_ := reopen_if_closed(store, args.run_id)) is not None:
                    print(f"rendezvous: {args.run_id!r} was closed by a leaving agent; reopened at round {round_}",
                          flush=True)
            except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError) as err:
                if str(err) != reported:  # once per distinct problem, not every second
                    reported = str(err)
                    print(f"rendezvous: cannot read the state of {args.run_id!r}: {err}", file=sys.stderr, flush=True)
    print("rendezvous: stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
