"""One process incarnation of a job, as the train loop drives telemetry: run as
`python -m tests.telemetry.incarnation RUN_DIR FIRST LAST EXIT_CODE MONITORING_ADDR [overrides...]`.
It trains steps FIRST..LAST (a checkpoint every 5 steps), then exits with EXIT_CODE after a
preemption notice and an emergency save when EXIT_CODE is 75."""

from __future__ import annotations

import sys
import time

from harness.chaos.fake_monitoring import FakeMonitoring
from harness.config import load
from harness.telemetry import events as ev
from harness.telemetry.telemetry import Telemetry


def main(run_dir: str, first: int, last: int, exit_code: int, address: str, overrides: list[str]) -> None:
    cfg = load([f"run.dir={run_dir}", "run.name=exp", "telemetry.job_metrics_s=0.2",
                "telemetry.monitoring.enabled=true", "telemetry.monitoring.project=proj", *overrides])
    tel = Telemetry.start(cfg, rank=0, local_rank=0, world_size=2, node="vm-a",
                          ledger_location=f"{run_dir}/checkpoints/ledger",
                          monitoring_client=FakeMonitoring().client(address))
    tel.event(ev.RENDEZVOUS_DONE)
    if first > 1:
        tel.event(ev.RESTORE_START)
        tel.event(ev.RESTORE_END, step=first - 1)
    for step in range(first, last + 1):
        time.sleep(0.01)
        tel.on_step(step, 0.01, {"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 1000.0, "world_size": 2})
        if step % 5 == 0:
            tel.event(ev.CKPT_BLOCK, step=step, seconds=0.002)
    if exit_code == 75:
        tel.event(ev.PREEMPTION_NOTICE, source="SIGTERM", step=last)
        tel.event(ev.EMERGENCY_SAVE, step=last, seconds=0.005, tier="local")
    tel.flush()
    tel.close(exit_code)
    print(f"run_id={tel.run_id}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
