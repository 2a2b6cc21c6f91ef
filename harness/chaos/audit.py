"""The trainers' sample audit as the cloud sees it: every completed step, timestamped when it lands.

With `train.audit_samples=true` each training process appends `step first_index stop_index` per
completed step to `${run.dir}/samples/rank<R>-<pid>.txt`. The run dir is on the VM's local SSD and
dies with it, so the cloud tails those files while the VMs live (and once more right before it
deletes one). Lines read together in one poll get times spread evenly since the previous poll.
A step that appears twice for rank 0 was computed twice: the first time was lost work.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FILE = re.compile(r"^rank(\d+)-(\d+)\.txt$")


@dataclass(frozen=True)
class StepDone:
    t: float  # time.time() when seen
    source: str  # "<vm>/<boot>/<file>": one process incarnation
    rank: int
    step: int  # the step index the line records (step `step` completed -> progress step+1)
    first: int
    stop: int


class AuditTail:
    def __init__(self) -> None:
        self.records: list[StepDone] = []
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, str] = {}
        self._seen_at: dict[str, float] = {}

    def poll(self, vm_label: str, run_dir: Path, now: float | None = None) -> int:
        """Read what was appended since the last poll; returns the number of new lines."""
        now = time.time() if now is None else now
        folder = run_dir / "samples"
        if not folder.is_dir():
            return 0
        new = 0
        for path in sorted(folder.iterdir()):
            m = FILE.match(path.name)
            if not m:
                continue
            source = f"{vm_label}/{path.name}"
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets.get(source, 0))
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            self._offsets[source] = self._offsets.get(source, 0) + len(data)
            text = self._partial.pop(source, "") + data.decode(errors="replace")
            lines = text.split("\n")
            if lines[-1]:
                self._partial[source] = lines[-1]
            lines = [line for line in lines[:-1] if line.strip()]
            since = self._seen_at.get(source, now)
            self._seen_at[source] = now
            for j, line in enumerate(lines):
                step, first, stop = (int(v) for v in line.split()[:3])
                t = since + (now - since) * (j + 1) / len(lines)
                self.records.append(StepDone(t, source, int(m.group(1)), step, first, stop))
            new += len(lines)
        return new

    def rank0(self) -> list[StepDone]:
        return sorted((r for r in self.records if r.rank == 0), key=lambda r: r.t)

    def first_step_time(self) -> float | None:
        return min((r.t for r in self.records), default=None)

    def lost_steps(self) -> int:
        """Step computations beyond the first of each step (rank 0's audit)."""
        counts = Counter(r.step for r in self.records if r.rank == 0)
        return sum(n - 1 for n in counts.values())

    def repeated_samples(self) -> int:
        """Global sample indices trained on more than once, over all ranks."""
        counts: Counter[int] = Counter()
        for r in self.records:
            counts.update(range(r.first, r.stop))
        return sum(n - 1 for n in counts.values() if n > 1)

    def skipped_samples(self, sample_index: int) -> int:
        """Global sample indices below `sample_index` (where the job ended) that no rank trained on."""
        seen: set[int] = set()
        for r in self.records:
            seen.update(range(r.first, min(r.stop, sample_index)))
        return sample_index - len(seen)
