"""The queue of a sweep deployed on Google Cloud: at most `sweep.max_concurrent` jobs hold VMs, the
others wait with their worker MIG at size 0, and each finishing job starts the next.

Where the decision runs, and why it survives preemptions:
- The queue is data, fixed at deploy time: every training VM of the sweep carries the metadata key
  `spot-sweep-queue` (the same value on every job's template): the bucket, `max_concurrent`, and per
  job in queue order its run name, its worker group, that group's size and `train.max_steps`.
  `make deploy` sets the initial sizes: the first `max_concurrent` jobs at their size, the rest at 0.
- The decision runs on the finishing job's global rank 0, in the job's end (harness/job_end.py):
  after its `finished` record is in the bucket and *before* its own groups are resized to 0. It is a
  pure function of durable state: the jobs that should hold VMs are the first `max_concurrent` jobs
  in queue order whose `finished` record (in the bucket) does not reach their train.max_steps. Rank 0
  resizes each of them to its size. Every resize is idempotent (a group already at its size stays
  there), and the set only moves forward as records appear, so a job once started stays in it until
  it finishes: never more than `max_concurrent` jobs hold VMs, and two jobs finishing at once agree.
- A preemption in the middle changes nothing: before the resize to 0 of its own groups the job's MIG
  still recreates its VM, whose launcher finds the `finished` record (`already_finished`) and takes the
  same decision again, then resizes its groups to 0. Nothing runs anywhere else: no scheduler VM,
  no Cloud Function, nothing to keep alive while every job is queued.
- A job that never finishes (failed, crash-looping) keeps its place; `make sweep-status` shows it.
  Its MIG resized to 0 by hand frees the quota but not the place: give it a finished record or
  redeploy the sweep without it.
Permissions: the trainers' custom role (one permission, compute.instanceGroupManagers.update) covers
every group of the sweep's deployment (infra/constructs/iam.py), and they already read the bucket.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

from harness import job_end
from harness.checkpoint.store import StoreError
from harness.preemption import gce_metadata as metadata

QUEUE_KEY = "spot-sweep-queue"
READ_RETRY_S = 10.0


def durable_url(bucket: str, run_name: str) -> str:
    """A job's bucket tier, as startup/startup.sh gives it (infra/constructs/storage.py checkpoint_prefix)."""
    return f"gs://{bucket}/runs/{run_name}/checkpoints"


@dataclass(frozen=True)
class Entry:
    run: str  # run.name
    group: str  # the worker group's resource path
    size: int  # its size while the job runs
    max_steps: int


@dataclass(frozen=True)
class Queue:
    sweep: str
    bucket: str
    max_concurrent: int | None
    jobs: tuple[Entry, ...]

    def to_metadata(self) -> str:
        """The `spot-sweep-queue` value: compact JSON, no whitespace, no Terraform template sequence."""
        return json.dumps({"sweep": self.sweep, "bucket": self.bucket, "max_concurrent": self.max_concurrent,
                           "jobs": [asdict(e) for e in self.jobs]}, separators=(",", ":"))

    @classmethod
    def from_metadata(cls, value: str) -> Queue:
        try:
            raw = json.loads(value)
            jobs = tuple(Entry(str(j["run"]), str(j["group"]), int(j["size"]), int(j["max_steps"]))
                         for j in raw["jobs"])
            queue = cls(str(raw["sweep"]), str(raw["bucket"]), raw.get("max_concurrent"), jobs)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"metadata key {QUEUE_KEY}: not a sweep queue ({type(err).__name__}: {err})") from None
        for e in jobs:
            if not job_end.GROUP_PATH.fullmatch(e.group):
                raise ValueError(f"metadata key {QUEUE_KEY}: {e.group!r} is not an instance group path")
        return queue

    @property
    def width(self) -> int:
        return self.max_concurrent or len(self.jobs)

    def initial_sizes(self) -> list[int]:
        """Each job's worker group size at deploy time: the first `max_concurrent` run, the rest wait."""
        return [e.size if i < self.width else 0 for i, e in enumerate(self.jobs)]

    def to_start(self, finished: set[str]) -> list[Entry]:
        """The jobs that should hold VMs now: the first `max_concurrent` not yet finished, in order."""
        return [e for e in self.jobs if e.run not in finished][: self.width]


def finished_runs(queue: Queue) -> set[str]:
    """The jobs whose `finished` record in the bucket reaches their train.max_steps. A record that cannot
    be read counts as not finished: the job keeps its place (never one job too many)."""
    from harness.checkpoint.gcs_store import GCSStore

    done = set()
    for e in queue.jobs:
        try:
            record = job_end.read(GCSStore(durable_url(queue.bucket, e.run), retry_deadline_s=READ_RETRY_S))
        except StoreError as err:
            print(f"sweep queue: {e.run}: {err}; counted as not finished", file=sys.stderr, flush=True)
            continue
        if record is not None and record.step >= e.max_steps:
            done.add(e.run)
    return done


def advance() -> list[str]:
    """On a finishing job's rank 0 (harness/job_end.py): resize the jobs that should run now to their
    size; the group paths resized. Nothing off GCE, nothing without the key; never raises."""
    try:
        value = metadata.attribute(QUEUE_KEY)
    except OSError as err:
        print(f"sweep queue: cannot read {QUEUE_KEY} ({err}): the next jobs are started by the next VM that "
              "finds this job finished", file=sys.stderr, flush=True)
        return []
    if value is None:
        return []
    try:
        queue = Queue.from_metadata(value)
    except ValueError as err:
        print(f"sweep queue: {err}", file=sys.stderr, flush=True)
        return []
    if "GCE_METADATA_HOST" in os.environ and not os.environ.get(job_end.ENDPOINT_ENV):
        print(f"sweep queue: the metadata server is a stand-in and {job_end.ENDPOINT_ENV} is unset: no real "
              "instance group is resized", file=sys.stderr, flush=True)
        return []
    try:
        start = queue.to_start(finished_runs(queue))
        session = job_end._session()
    except Exception as err:  # noqa: BLE001 - the job's result never depends on the queue
        print(f"sweep queue: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return []
    resized = []
    for e in start:
        try:
            job_end.resize(e.group, e.size, session=session)
            resized.append(e.group)
            print(f"sweep queue {queue.sweep}: {e.run} runs ({e.group} at size {e.size})", flush=True)
        except job_end.ResizeError as err:
            print(f"sweep queue: {err}; start it by hand: {job_end.gcloud_resize(e.group, e.size)}",
                  file=sys.stderr, flush=True)
    return resized
