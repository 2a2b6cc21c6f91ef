"""The uninterrupted run of a chaos job's config, whose final `model_sha256` decides `exact`.

The same training overrides at the same world size, on one node under `harness.launch` with a local
checkpoint store and nothing interrupting it. It runs beside the local cloud (a paced job leaves the
CPU mostly idle) and is cached by config: a second `make chaos` of the same job reuses its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.chaos.cloud import PYCACHE
from harness.chaos.vm import REPO
from harness.process_tree import descendants


class Reference:
    def __init__(self, job_overrides: list[str], world_size: int, cache: Path, timeout_s: float):
        key = hashlib.sha256(json.dumps([world_size, *job_overrides]).encode()).hexdigest()[:16]
        self.folder = (cache / key).resolve()
        self.summary = self.folder / "run" / "summary.json"
        self.timeout_s = timeout_s
        self.cmd = [sys.executable, "-m", "harness.launch", *job_overrides, "launch.standalone=true",
                    f"launch.nproc_per_node={world_size}", "launch.max_restarts=0", "run.name=reference",
                    f"run.dir={self.folder / 'run'}", f"checkpoint.store={self.folder / 'run' / 'checkpoints'}",
                    "checkpoint.slower_tiers=[]", "health.enabled=false", "train.audit_samples=false"]
        self._proc: subprocess.Popen | None = None

    def start(self) -> Reference:
        """Start the run in the background, unless a finished one is cached."""
        if self.summary.is_file():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(self.folder),
               "PYTHONPYCACHEPREFIX": str(PYCACHE)}
        for leftover in ("GCE_METADATA_HOST", "PYTHONDONTWRITEBYTECODE"):
            env.pop(leftover, None)
        print(f"chaos: reference run (uninterrupted) in {self.folder}", flush=True)
        with open(self.folder / "log.txt", "wb") as log:
            self._proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        return self

    def model_sha256(self) -> str:
        """Wait for the run; its final model's hash."""
        if self._proc is not None:
            try:
                code = self._proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
            if code != 0 or not self.summary.is_file():
                tail = (self.folder / "log.txt").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the reference run failed (exit {code}); its log ends:\n{tail}")
        return json.loads(self.summary.read_text())["model_sha256"]

    def stop(self) -> None:
        """Kill the run and everything below it (torchrun's workers run in sessions of their own)."""
        if self._proc is not None and self._proc.poll() is None:
            for pid in [self._proc.pid, *descendants(self._proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._proc.wait()
