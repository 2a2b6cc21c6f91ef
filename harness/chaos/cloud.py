"""The local Spot cloud: the VMs of a deployment's topology (`topology=hybrid`: an on-demand master
that trains and whose agent hosts the c10d store, plus Spot workers; `topology=all_spot`: an
on-demand coordinator running `harness.rendezvous`, plus Spot workers), and a shared bucket
(fake-gcs-server), all on this machine.

Every VM gets the metadata `infra/vm.py` builds for the same topology and job, scripts included,
changed only as `differences.py` lists. The cloud boots the VMs (startup.sh does the rest, as on
GCP), tails the trainers' sample audit, and replays the preemption schedule on the Spot VMs the GCP
way: at T the VM's `instance/preempted` turns TRUE and its shutdown script runs (which SIGTERMs the
trainer); the VM stops when its shutdown is done, or is killed outright at T + notice_s, and its
disks are gone. Like a MIG, the cloud recreates a stopped Spot VM (same name, blank disks) after
`recreate_s`, and autoheals: it probes each VM as the deployment's health check does (GET /healthz
on trainers, a TCP connect to the store on the coordinator) every `chaos.health_interval_s` once
`chaos.health_initial_delay_s` has passed since the boot, and recreates a VM after
`infra.health_check.unhealthy_threshold` failures in a row. The instance groups' target sizes live
in a local Compute API (compute.py) that the job's end resizes through (harness/job_end.py): a
group at size 0 recreates nothing and its VMs are deleted once their unit has ended. The job's
metrics go to a local Cloud Monitoring server (monitoring.py). The cloud stops when the job has
written its summary and every trainer has exited, or at `max_duration_s`; with
`chaos.boot_after_end` it then boots one Spot VM again (a recreate racing the resize), which must
exit without training.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.chaos import differences
from harness.chaos.audit import AuditTail
from harness.chaos.differences import Difference
from harness.chaos.fake_compute import FakeCompute
from harness.chaos.fake_gcs import FakeGCSServer, free_port
from harness.chaos.fake_monitoring import FakeMonitoring
from harness.chaos.schedule import Preemption
from harness.chaos.systemctl import unit_exits
from harness.chaos.vm import SSD_NAME, TRAIN_UNIT, Vm, VmSpec
from harness.job_end import ENDPOINT_ENV
from harness.telemetry.ledger import ledger_location, read_ledger
from infra import vm as infra_vm
from infra.settings import Settings

# A VM image holds compiled bytecode; a cache outside the venv (which stays untouched) stands in for it.
PYCACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spot-harness" / "pycache"
RELEASE = "local-checkout"  # spot-release: startup.sh installs no release here (differences: release)
UNITS = {"coordinator": "spot-rendezvous.service"}  # every other role runs the training unit
SHUTDOWN_CHECK_S = 0.25  # how often a preempted VM is asked whether its shutdown is done
FINISH_GRACE_S = 60.0  # after the summary appears, how long trainers get to exit


def vm_specs(settings: Settings, found: list[Difference], rdzv_endpoint: str, vms: Path) -> list[VmSpec]:
    """The topology's VMs, master or coordinator first, each with the metadata infra/vm.py builds for
    its group, changed as `found` lists; a VM's disks live in `vms/<name>/dev/`."""
    scripts = infra_vm.startup_scripts(settings)
    specs = []
    for group in infra_vm.groups(settings):
        for n in range(group.size):
            name = group.role if group.role != "worker" else f"worker-{n}"
            attrs = {**scripts, **infra_vm.attributes(settings, group, rdzv_endpoint=rdzv_endpoint,
                                                      bucket=settings.infra.bucket.name, release=RELEASE)}
            attrs |= differences.attributes(found)
            disks = [f"{SSD_NAME}{i}" for i in range(group.node.local_ssd_count)]
            if "spot-hydra-overrides" in attrs:
                attrs["spot-hydra-overrides"] = " ".join([attrs["spot-hydra-overrides"],
                                                          *differences.job_overrides(found)])
                attrs["spot-health-port"] = str(free_port())
            if "spot-pd-device" in attrs:
                disks.append(Path(attrs["spot-pd-device"]).name)
                attrs["spot-pd-device"] = str((vms / name / "dev" / disks[-1]).resolve())
            specs.append(VmSpec(name, group.role, group.spot, attrs, disks))
    return specs


@dataclass
class Event:
    t: float
    kind: str  # boot | recreate | up | preempt | missed | off | boot_failed | finished | timeout
    vm: str
    detail: str = ""


@dataclass
class Outcome:
    """What happened, for the report."""

    start: float  # the first training VM's first boot
    end: float
    clock: float | None  # time of the first completed step: where the schedule's times start
    finished: bool
    events: list[Event]
    audit: AuditTail
    summary: dict[str, Any] | None
    ledger: list[dict[str, Any]]
    schedule: list[Preemption]
    logs: Path
    world_size: int
    vms: list[dict[str, Any]]
    groups: list[dict[str, Any]]  # per instance group: role, path, size at the start and at the end
    monitoring_series: int  # time series the job wrote to the local Cloud Monitoring server
    after_end: dict[str, Any] | None  # chaos.boot_after_end: the late VM's name, unit exits, steps it trained


class State(StrEnum):
    """A VM slot's state, as the cloud tends it."""

    BOOTING = "booting"  # startup.sh running
    UP = "up"
    PREEMPTED = "preempted"  # in its notice: the shutdown script runs
    DOWN = "down"  # stopped; the MIG recreates it at recreate_at
    DELETED = "deleted"  # its group was resized to 0: never recreated


@dataclass
class Slot:
    """A VM name that the cloud keeps filled (one MIG instance, the master or the coordinator)."""

    spec: VmSpec
    group: str  # the instance group's resource path (infra/vm.py's group_paths)
    vm: Vm | None = None
    boots: int = 0
    preemptions: int = 0
    rank0_preemptions: int = 0  # preemptions of a boot that ran global rank 0
    autoheals: int = 0  # recreated after failing the health check
    state: State = State.DOWN
    since: float = 0.0
    recreate_at: float | None = None
    next_check: float = 0.0
    next_probe: float = 0.0
    failed_probes: int = 0

    @property
    def trains(self) -> bool:
        return self.spec.role != "coordinator"

    def logs(self, out: Path, boot: int) -> Path:
        return out / "logs" / self.spec.name / f"boot-{boot}"


@dataclass
class Cloud:
    cfg: DictConfig  # the composed config; `chaos.*` drives the cloud
    settings: Settings  # the deployment of the same job and topology (infra/settings.py)
    out: Path
    schedule: list[Preemption]  # over the Spot VMs, in their order
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.chaos = self.cfg.chaos
        self.out = self.out.resolve()
        self.tag = uuid.uuid4().hex[:8]
        self.audit = AuditTail()
        self.rdzv_port, self.monitoring_port = free_port(), free_port()
        # What differs from the deployment (differences.py), addresses included.
        self.found = differences.differences(self.cfg, self.settings,
                                             monitoring_endpoint=f"127.0.0.1:{self.monitoring_port}")
        paths = infra_vm.group_paths(self.settings)
        self.slots = [Slot(spec, paths[spec.role])
                      for spec in vm_specs(self.settings, self.found, f"127.0.0.1:{self.rdzv_port}", self.out / "vms")]
        self.initial_sizes = {group: sum(s.group == group for s in self.slots) for group in paths.values()}
        self.health_check = self.settings.infra.health_check
        self.trainers = [s for s in self.slots if s.trains]
        self.spot = [s for s in self.slots if s.spec.spot]
        self.world_size = sum(int(s.spec.attributes["spot-nproc-per-node"]) for s in self.trainers)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> Outcome:
        gcs = FakeGCSServer(workdir=self.out / "gcs").start()
        gcs.make_bucket(self.settings.infra.bucket.name)
        self.compute = FakeCompute(self.initial_sizes)
        monitoring = FakeMonitoring(port=self.monitoring_port).start()
        self.env = {"STORAGE_EMULATOR_HOST": gcs.host, "PYTHONPYCACHEPREFIX": str(PYCACHE),
                    ENDPOINT_ENV: self.compute.endpoint}
        first, workers = self.slots[0], self.slots[1:]
        after_end = None
        try:
            # The job's wall time starts with its first training VM; a coordinator is infrastructure.
            start = time.time()
            self._boot(first, start)
            self._wait_for_port(self.rdzv_port, self.chaos.boot_timeout_s)
            if not first.trains:
                start = time.time()
            for i, slot in enumerate(workers):
                # VMs never start in the same instant; booting the store's host first, then worker i after
                # worker i-1, orders the agents as the VMs' hostnames would on GCP (differences: hostname).
                time.sleep(self.chaos.boot_stagger_s if i else 0.0)
                self._boot(slot, time.time())
            finished, summary, clock = self._loop(start)
            end = time.time()
            if finished and self.chaos.boot_after_end and self.spot:
                after_end = self._boot_after_end(self.spot[0])
            ledger = self._read_ledger(gcs.host)
            (self.out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
        finally:
            for slot in reversed(self.slots):
                if slot.vm is not None:
                    slot.vm.delete()
            gcs.close()
            self.compute.close()
            monitoring.stop()
        groups = [{"role": role, "path": path, "size": self.initial_sizes[path],
                   "final_size": self.compute.sizes.get(path)}
                  for role, path in infra_vm.group_paths(self.settings).items()]
        return Outcome(start, end, clock, finished, self.events, self.audit, summary, ledger, self.schedule,
                       self.out / "logs", self.world_size, [self._record(s) for s in self.slots], groups,
                       len(monitoring.series()), after_end)

    def _record(self, slot: Slot) -> dict[str, Any]:
        """The report's entry for one VM; `unit_exits` are its unit's main-process exits over all boots."""
        spec = slot.spec
        unit = UNITS.get(spec.role, TRAIN_UNIT)
        return {"name": spec.name, "role": spec.role, "provisioning": "SPOT" if spec.spot else "STANDARD",
                "boots": slot.boots, "preemptions": slot.preemptions, "rank0_preemptions": slot.rank0_preemptions,
                "autoheals": slot.autoheals, "unit": unit, "unit_exits": [code for n in range(1, slot.boots + 1)
                                             for code in unit_exits(slot.logs(self.out, n), unit)]}

    def _loop(self, start: float) -> tuple[bool, dict | None, float | None]:
        pending = list(self.schedule)
        clock: float | None = None
        summary_seen: float | None = None
        poll_s, deadline = self.chaos.poll_s, start + self.chaos.max_duration_s
        while True:
            now = time.time()
            for slot in self.slots:
                self._tend(slot, now)
            if clock is None:
                clock = self.audit.first_step_time()
            while clock is not None and summary_seen is None and pending and clock + pending[0].at_s <= now:
                due = pending[0]
                target = self.spot[due.vm]
                if due.phase is not None and self._phase(target) != due.phase:
                    break  # not yet in that phase: later entries wait behind this one
                self._preempt(target, now, pending.pop(0).phase)
            if summary_seen is None and (summary := self._summary()) is not None:
                summary_seen = now
                self._event(now, "finished", "job", "summary.json written")
            if summary_seen is not None and (
                    all(self._unit_ended(s) for s in self.trainers)
                    or now > summary_seen + FINISH_GRACE_S):
                self._delete_retired(time.time())
                return True, summary, clock
            if now > deadline:
                self._event(now, "timeout", "job", f"chaos.max_duration_s={self.chaos.max_duration_s} reached")
                return False, None, clock
            time.sleep(poll_s)

    def _tend(self, slot: Slot, now: float) -> None:
        """Advance one VM's slot: notice its boot, tail its audit, probe its health, power it off,
        recreate it; a slot whose group was resized to 0 is deleted once its unit has ended."""
        vm = slot.vm
        if vm is not None and slot.trains:
            self.audit.poll(self._label(slot), vm.run_dir, now)
        if self.compute.sizes.get(slot.group, 1) == 0 and slot.state != State.DELETED:
            # Deleted once its unit has ended; the store's host once every trainer's has (their agents'
            # exit barrier goes through it, as a MIG's graceful delete gives them time to).
            ended = vm is None or slot.state == State.PREEMPTED or (
                self._unit_ended(slot) if slot.trains else all(self._unit_ended(t) for t in self.trainers))
            if ended:
                self._delete(slot, now)
            return
        if slot.state == State.UP and vm is not None and now >= slot.next_probe:
            self._probe(slot, now)
        elif slot.state == State.BOOTING and vm is not None and (code := vm.booted()) is not None:
            if code == 0:
                self._event(now, "up", slot.spec.name, f"startup.sh done in {now - slot.since:.1f}s")
                slot.state, slot.since = State.UP, now
            else:
                self._event(now, "boot_failed", slot.spec.name, f"startup.sh exited {code}; see {vm.logs}")
                self._power_off(slot, now, "boot failed")
        elif slot.state == State.PREEMPTED and vm is not None and now >= slot.next_check:
            slot.next_check = now + SHUTDOWN_CHECK_S
            hard_stop = now >= slot.since + self.chaos.notice_s
            if hard_stop or vm.shut_down():
                how = "hard stop at the end of the notice" if hard_stop else "shutdown complete"
                self._power_off(slot, now, f"{how}, {now - slot.since:.1f}s after the notice")
        elif slot.state == State.DOWN and slot.recreate_at is not None and now >= slot.recreate_at:
            self._boot(slot, now)

    def _unit_ended(self, slot: Slot) -> bool:
        """The slot's training unit has run and ended, and its exit is in the VM's journal (deleting the
        VM before that line is written would lose it)."""
        return slot.vm is None or (slot.vm.trainer_finished()
                                   and bool(unit_exits(slot.logs(self.out, slot.boots), TRAIN_UNIT)))

    def _probe(self, slot: Slot, now: float) -> None:
        """The deployment's health check, time-compressed: HTTP /healthz on a trainer, TCP on the store."""
        check = self.health_check
        slot.next_probe = now + self.chaos.health_interval_s
        if now < slot.since + self.chaos.health_initial_delay_s:
            return
        timeout = min(1.0, float(check.timeout_s))
        if slot.trains:
            healthy = self._healthz(slot, timeout)[0] == 200
        else:
            try:
                with socket.create_connection(("127.0.0.1", self.rdzv_port), timeout=timeout):
                    healthy = True
            except OSError:
                healthy = False
        slot.failed_probes = 0 if healthy else slot.failed_probes + 1
        if slot.failed_probes >= int(check.unhealthy_threshold):
            slot.autoheals += 1
            slot.failed_probes = 0
            self._event(now, "autoheal", slot.spec.name, f"{check.unhealthy_threshold} failed health checks")
            self._power_off(slot, now, "recreated by autohealing")

    def _healthz(self, slot: Slot, timeout: float) -> tuple[int | None, str | None]:
        """The VM's GET /healthz: its status code and phase; (None, None) when it does not answer."""
        port = int(slot.spec.attributes["spot-health-port"])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as resp:
                return resp.status, json.loads(resp.read()).get("phase")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}").get("phase")
        except (OSError, ValueError):
            return None, None

    def _phase(self, slot: Slot) -> str | None:
        """The phase the VM's /healthz reports now, None when it does not answer."""
        if slot.vm is None or slot.state not in (State.BOOTING, State.UP) or not slot.trains:
            return None
        return self._healthz(slot, 1.0)[1]

    def _delete(self, slot: Slot, now: float) -> None:
        """The MIG was resized to 0: the VM is deleted and never recreated."""
        if slot.vm is not None:
            slot.vm.kill()
            if slot.trains:
                self.audit.poll(self._label(slot), slot.vm.run_dir, time.time())
            slot.vm.delete()
            slot.vm = None
            self._event(now, "deleted", slot.spec.name, "its instance group was resized to 0")
        slot.state, slot.since, slot.recreate_at = State.DELETED, now, None

    def _delete_retired(self, now: float) -> None:
        for slot in self.slots:
            if self.compute.sizes.get(slot.group, 1) == 0 and slot.state != State.DELETED:
                self._delete(slot, now)

    def _boot_after_end(self, slot: Slot) -> dict[str, Any]:
        """A VM that boots after the job's end (a recreate racing the resize): it must find the finished
        record, exit without training, and resize the groups again."""
        before = len(self.audit.records)
        slot.state = State.DOWN
        self._boot(slot, time.time())
        unit, logs = UNITS.get(slot.spec.role, TRAIN_UNIT), slot.logs(self.out, slot.boots)
        deadline = time.monotonic() + self.chaos.boot_timeout_s + FINISH_GRACE_S
        while slot.vm is not None and not unit_exits(logs, unit) and time.monotonic() < deadline:
            self.audit.poll(self._label(slot), slot.vm.run_dir)
            time.sleep(self.chaos.poll_s)
        self._delete(slot, time.time())
        return {"vm": slot.spec.name, "boot": slot.boots, "steps_trained": len(self.audit.records) - before,
                "unit_exits": unit_exits(slot.logs(self.out, slot.boots), unit)}

    def _boot(self, slot: Slot, now: float) -> None:
        slot.boots += 1
        name = slot.spec.name
        slot.vm = Vm(slot.spec, self.out / "vms" / name, slot.logs(self.out, slot.boots),
                     f"{self.tag}/{name}/{slot.boots}", self.env)
        slot.vm.boot()
        slot.state, slot.since, slot.recreate_at = State.BOOTING, now, None
        self._event(now, "boot" if slot.boots == 1 else "recreate", name, f"boot {slot.boots}")
        if not slot.spec.spot:
            self._wait_booted(slot)

    def _wait_booted(self, slot: Slot) -> None:
        deadline = time.monotonic() + self.chaos.boot_timeout_s
        while slot.vm is not None and (code := slot.vm.booted()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if code != 0:
            raise RuntimeError(f"{slot.spec.name}: startup.sh exited {code}; see {slot.vm.logs}/startup.log")
        slot.state = State.UP
        self._event(time.time(), "up", slot.spec.name, "startup.sh done")

    def _preempt(self, slot: Slot, now: float, phase: str | None = None) -> None:
        if slot.state not in (State.BOOTING, State.UP) or slot.vm is None:
            self._event(now, "missed", slot.spec.name, f"preemption due while the VM is {slot.state}")
            return
        slot.vm.preempt(self.chaos.notice_s)
        slot.state, slot.since, slot.next_check = State.PREEMPTED, now, now + SHUTDOWN_CHECK_S
        slot.preemptions += 1
        rank0 = self.audit.rank0()
        holds = bool(rank0) and rank0[-1].source.startswith(f"{self._label(slot)}/")
        slot.rank0_preemptions += holds
        self._event(now, "preempt", slot.spec.name, f"notice {self.chaos.notice_s}s"
                    + (", holds global rank 0" if holds else "") + (f", during {phase}" if phase else ""))

    def _power_off(self, slot: Slot, now: float, why: str) -> None:
        """The VM is gone: read its audit one last time, kill it, wipe its disks; the MIG recreates it."""
        assert slot.vm is not None
        slot.vm.kill()
        if slot.trains:
            self.audit.poll(self._label(slot), slot.vm.run_dir, time.time())
        slot.vm.delete()
        slot.vm = None
        slot.state, slot.since, slot.failed_probes = State.DOWN, now, 0
        slot.recreate_at = now + self.chaos.recreate_s
        self._event(now, "off", slot.spec.name, why)

    # ------------------------------------------------------------------ observations

    def _label(self, slot: Slot) -> str:
        return f"{slot.spec.name}/boot-{slot.boots}"

    def _summary(self) -> dict | None:
        for slot in self.trainers:
            if slot.vm is not None and (path := slot.vm.run_dir / "summary.json").is_file():
                try:
                    return json.loads(path.read_text())
                except (OSError, ValueError):
                    return None
        return None

    def _read_ledger(self, gcs_host: str) -> list[dict[str, Any]]:
        """The job's goodput ledger in the bucket (the checkpoint store's durable tier), when the trainer
        keeps one; empty otherwise."""
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = gcs_host
        try:
            return read_ledger(ledger_location(f"gs://{self.settings.infra.bucket.name}/runs/{self.settings.run_id}/checkpoints"))
        except Exception:  # noqa: BLE001 - a missing or unreadable ledger only means no ledger breakdown
            return []
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous

    def _event(self, t: float, kind: str, vm: str, detail: str = "") -> None:
        self.events.append(Event(t, kind, vm, detail))
        print(f"[chaos {t - (self.events[0].t if self.events else t):7.1f}s] {vm:12s} {kind:11s} {detail}", flush=True)

    @staticmethod
    def _wait_for_port(port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the rendezvous store did not listen on port {port} within {timeout_s}s")
