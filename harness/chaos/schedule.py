"""When each Spot VM is preempted: a seeded schedule, the same for every trainer it is replayed against.

Each Spot VM slot gets its own Poisson process: exponential inter-arrival times with mean `mtbi_s`
(the mean time between interruptions of one VM), from a generator seeded by (seed, slot), so a slot's
preemptions do not depend on the horizon or on how many slots there are.
Times count from the job's first completed step, so a slow boot does not shift preemptions out of
the training. An explicit list (`[{vm: 0, at_s: 12.5}, ...]`) replaces the draw; an entry with
`phase` (e.g. `{vm: 0, at_s: 10, phase: rendezvous}`) fires at the first moment from `at_s` on that
the VM's /healthz reports that phase: a preemption during a recreated VM's rendezvous, on purpose.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PHASES = ("starting", "rendezvous", "restoring", "training", "saving")  # harness/health.py's


@dataclass(frozen=True, order=True)
class Preemption:
    at_s: float  # seconds after the first completed step
    vm: int  # the Spot VM's index among the topology's Spot VMs (the workers, in order)
    phase: str | None = field(default=None, compare=False)  # wait for this /healthz phase from at_s on


def exponential(slots: int, mtbi_s: float, horizon_s: float, seed: int) -> list[Preemption]:
    """Every arrival before `horizon_s` of `slots` independent Poisson processes of mean gap `mtbi_s`."""
    if mtbi_s <= 0:
        raise ValueError(f"chaos.mtbi_s={mtbi_s} must be > 0")
    out = []
    for vm in range(slots):
        rng = random.Random(f"chaos-{seed}-{vm}")
        t = rng.expovariate(1.0 / mtbi_s)
        while t < horizon_s:
            out.append(Preemption(round(t, 3), vm))
            t += rng.expovariate(1.0 / mtbi_s)
    return sorted(out)


def explicit(entries: Iterable[Mapping], slots: int) -> list[Preemption]:
    out = []
    for entry in entries:
        vm, at_s, phase = int(entry["vm"]), float(entry["at_s"]), entry.get("phase")
        if not 0 <= vm < slots or at_s < 0:
            raise ValueError(f"chaos.preemptions: {dict(entry)} needs 0 <= vm < {slots} and at_s >= 0")
        if phase is not None and phase not in PHASES:
            raise ValueError(f"chaos.preemptions: {dict(entry)}: phase must be one of {', '.join(PHASES)}")
        out.append(Preemption(at_s, vm, phase))
    return sorted(out)


def build(cfg, slots: int) -> list[Preemption]:
    """The schedule of `chaos.*` (typed by harness/chaos/__main__.py's ChaosConfig) over `slots` Spot
    VMs: `preemptions` when given, else the seeded exponential draw."""
    if cfg.get("preemptions"):
        return explicit(cfg.preemptions, slots)
    return exponential(slots, cfg.mtbi_s, cfg.max_duration_s, cfg.seed)
