"""Build the torchrun command line from `launch.*` and run it: `python -m harness.launch [overrides]`.

Exit codes: 0 finished, 75 preempted (emergency checkpoint saved: restart me), 76 a planned stop
(maintenance on an on-demand VM: the unit restarts it), 2 bad config, other non-zero a failure.
torchrun reports a worker's preempted exit as a failure, so the launcher reads the files the trainer
leaves to tell them apart: PREEMPTED on a node that got the notice (return 75), REJOIN on every other
node of the job, whose launcher then runs torchrun again for the next rendezvous round, so a
survivor's VM and unit never stop (and the hybrid master keeps hosting the c10d store for the round).
Why a launcher loop rather than torchrun's own restarts: torchrun's restart budget
(`launch.max_restarts`) is for real errors and stops a crash loop; a peer's preemption is not an
error and must not spend it. SIGTERM and SIGINT are passed on to torchrun, whose
agent passes them to the workers and waits `launch.shutdown_timeout_s` before killing them. A notice
that comes while no trainer runs (rendezvous, startup) is still a preemption: nothing new needs
saving, so the launcher writes the marker itself (`source: launcher`) and returns 75.

A restart's time goes mostly to starting Pythons: the launcher, torchrun's agent, and each worker,
each importing torch. With `launch.workers=fork` torchrun forks the workers from its agent, which has
torch imported already (`--start-method=fork --run-path harness/forked.py -m MODULE`), instead of
starting one interpreter per worker; `auto` (the default) forks except on a node with NVIDIA GPUs,
where forked workers using CUDA have not been tried yet. Each round tells its trainers when it started
(SPOT_LAUNCHED_AT: the launcher's own start for the first), so a start's split counts from there.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from harness import config, job_end
from harness.batching import max_nodes
from harness.checkpoint.store import StoreError
from harness.checkpoint.tiers import build_tiers
from harness.health import HEALTH_FILE_ENV, Bounds, LauncherHealth, serve
from harness.preemption.notice import (
    MAINTENANCE,
    PLANNED_STOP_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTED_MARKER,
    REJOIN_MARKER,
)
from harness.telemetry.clock import process_start_time
from harness.telemetry.events import LAUNCHED_ENV

# torchrun reuses one TCP store across rendezvous rounds, so after a restart a worker can read a dead
# peer's address and gloo/NCCL fail to connect (pytorch/pytorch#167288). A store per round avoids it.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
FORKED = Path(__file__).resolve().parent / "forked.py"  # what a forked worker runs (launch.workers=fork)


def fork_workers(workers: str) -> bool:
    """`launch.workers`: fork, exec, or auto: fork unless this node has NVIDIA GPUs (its driver's
    control device is there)."""
    return workers == "fork" or (workers == "auto" and not Path("/dev/nvidiactl").exists())


def torchrun_command(cfg: DictConfig, overrides: list[str]) -> list[str]:
    launch = cfg.launch
    fork = fork_workers(launch.workers)
    # -u: a forked worker keeps its agent's streams, so the agent's are unbuffered as torchrun makes a worker's
    cmd = [sys.executable, *(["-u"] if fork else []), "-m", "torch.distributed.run",
           f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.standalone:
        cmd.append("--standalone")
    else:
        most, shrink = max_nodes(launch), cfg.elastic.on_preemption == "shrink"
        nnodes = launch.nnodes if shrink else f"{most}:{most}"
        cmd += [f"--nnodes={nnodes}", f"--rdzv-backend={launch.rdzv_backend}",
                f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-id={config.rdzv_id(cfg.run.name)}"]
        conf = [launch.rdzv_conf] if launch.rdzv_conf else []
        if shrink and "last_call_timeout" not in (launch.rdzv_conf or ""):
            conf.append(f"last_call_timeout={int(cfg.elastic.shrink_last_call_s)}")
        if conf:
            cmd.append(f"--rdzv-conf={','.join(conf)}")
    cmd.append(f"--max-restarts={launch.max_restarts}")
    if torchrun_has_shutdown_timeout():
        cmd.append(f"--shutdown-timeout={launch.shutdown_timeout_s}")
    if fork:
        cmd += ["--start-method=fork", "--run-path", str(FORKED)]
    return [*cmd, "-m", launch.module, *overrides]


@functools.cache
def torchrun_has_shutdown_timeout() -> bool:
    """torchrun grew --shutdown-timeout after 2.11 (whose parser rejects it); read torchrun's source
    rather than import torch, which would cost the launcher seconds at every restart."""
    spec = importlib.util.find_spec("torch")
    run_py = Path(spec.origin).parent / "distributed" / "run.py" if spec and spec.origin else None
    return bool(run_py and run_py.is_file() and "--shutdown-timeout" in run_py.read_text())


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.load(overrides)
        for tier in build_tiers(config.checkpoint_config(cfg)):
            tier.store.check_access()
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if job_end.already_finished(cfg):  # a VM booted after the job's end: nothing to train, stop the groups
        return 0
    run_dir = Path(cfg.run.dir)
    marker, rejoin = run_dir / PREEMPTED_MARKER, run_dir / REJOIN_MARKER
    cmd = torchrun_command(cfg, overrides)
    env = {**TORCHRUN_ENV, **os.environ}
    notices: list[str] = []
    running: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        notices.append(signal.Signals(signum).name)
        if running:
            running[-1].send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    health = LauncherHealth(Bounds.of(cfg.health), run_dir / ".health.json")
    if cfg.health.enabled:
        run_dir.mkdir(parents=True, exist_ok=True)
        env[HEALTH_FILE_ENV] = str(health.report_file)
        serve(health, cfg.health.port)
    try:
        prefetch_data(cfg)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    launched = process_start_time()  # the first round's startup began with this process
    while True:  # one torchrun per rendezvous round this node takes part in
        rejoin.unlink(missing_ok=True)
        health.new_round()
        print("launch:", " ".join(cmd), flush=True)
        running.append(subprocess.Popen(cmd, env={**env, LAUNCHED_ENV: repr(launched)}))
        code = running[-1].wait()
        if code == 0:
            break
        if notices and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"step": None, "tier": "", "seconds": 0.0,
                                          "source": f"launcher:{notices[0]}", "ok": True,
                                          "detail": "no trainer was training: the newest committed "
                                                    "checkpoint is the state"}) + "\n")
        if marker.exists():
            return _stop_code(marker)
        if rejoin.exists():  # a peer was preempted; this node saved with it and goes on
            print(f"a peer node was preempted ({rejoin.read_text().strip()}): back to rendezvous", flush=True)
            launched = time.time()
            continue
        print(f"training failed with exit code {code} after at most launch.max_restarts="
              f"{cfg.launch.max_restarts} restarts; the root cause is in torchrun's report above", file=sys.stderr)
        return code
    summary = Path(cfg.run.dir) / "summary.json"
    print(f"run dir: {cfg.run.dir}\n  summary: {summary}\n  checkpoints: {cfg.checkpoint.store}\n"
          f"  wandb: {cfg.wandb.dir}/wandb ({cfg.wandb.mode})", flush=True)
    return 0


def prefetch_data(cfg: DictConfig) -> None:
    """Fill this node's cache of gs:// token files (harness/data/gcs_cache.py) before torchrun starts: a slow
    download then delays only this node's rendezvous, never a collective with a timeout, and a
    preemption mid-download resumes it at the next boot. The trainers find the copies in the cache."""
    data = cfg.data
    sources = [data.get("path"), *(data.get("paths") or [])]
    if not any(str(s).startswith("gs://") for s in sources if s):
        return
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate  # builds the dataset as the trainer will: the download and its checks

    print("launch: filling the data cache (data.cache_dir) before the rendezvous", flush=True)
    logging.basicConfig(level=logging.INFO, format="launch: %(message)s")  # the cache's own report
    try:
        instantiate(data, seed=cfg.seed, _convert_="all")
    except InstantiationException as err:  # Hydra wraps what the dataset raised
        if isinstance(err.__cause__, config.ConfigError):
            raise err.__cause__ from None
        raise


def _stop_code(marker: Path) -> int:
    """75 (preempted: the VM goes away), or the planned-stop code the unit restarts on."""
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    return PLANNED_STOP_EXIT_CODE if kind == MAINTENANCE else PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
