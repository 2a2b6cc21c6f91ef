"""The job's end is the deployment's end: last step -> final checkpoint and a `finished` record
beside it -> every instance group of the deployment resized to 0 -> no VM trains or bills again.

Contract:
- The record is `finished.json` in the durable tier (the last checkpoint tier: the bucket on a VM, a
  local directory locally), a JSON object: `step`, `model_sha256`, `time` (UTC, ISO 8601),
  `checkpoint_step` (the newest step committed in that tier then; null when none) and `final_loss`
  (the last step's loss on rank 0's share; null when unknown, absent in older records). Rank 0 writes it
  in `train.finish()` once summary.json is written (`job_finished`), then resizes the groups.
- A job is finished when its durable tier holds a record whose step reaches `train.max_steps`. The
  launcher asks before it starts torchrun (`already_finished`): on a VM that boots or restarts after
  the end it prints one line, resizes the groups to 0 and exits 0 without training. A record below
  `train.max_steps` (the same run asked to go further) does not stop it, nor does a record that cannot
  be read: the trainer then restores the final step, finishes at once and writes the record again.
- The groups are the VM's `spot-instance-groups` metadata attribute (built by infra/vm.py): resource
  paths `projects/P/regions/R/instanceGroupManagers/N` or `projects/P/zones/Z/instanceGroupManagers/N`,
  space-separated, resized in that order. Off GCE, or without the attribute, nothing is resized.
- In a sweep deployment the VM also carries `spot-sweep-queue`: before its own groups go to 0, rank 0
  starts the sweep's next queued jobs (harness/sweep/queue.py `advance`), on both paths above, so a
  preemption between the record and the resize is caught up by the VM the MIG recreates.
- A resize is `POST {endpoint}/{path}/resize?size=N` (`regionInstanceGroupManagers.resize`,
  `instanceGroupManagers.resize`), which needs only `compute.instanceGroupManagers.update`: the VMs'
  service account holds a custom role with that one permission, on these groups only
  (infra/constructs/iam.py). An accepted resize is the end of it: the MIG deletes the VMs itself, and
  waiting for the operation would need a second permission. 429, 5xx and network errors are retried
  for RESIZE_RETRY_S. A failed resize never changes the job's exit code: it is printed with the gcloud
  command that does it by hand, and the next VM the MIG boots tries again.
- Endpoint and credentials: SPOT_COMPUTE_ENDPOINT, default https://compute.googleapis.com/compute/v1.
  When it is set, requests carry anonymous credentials (as harness/checkpoint/gcs_store.py does for
  STORAGE_EMULATOR_HOST), so tests point it at a local HTTP server: there is no Compute emulator.
  Otherwise google.auth.default(): the metadata server's token on a VM, ADC where `make deploy` runs.
  A VM whose metadata server is a stand-in (GCE_METADATA_HOST set: a test, the local Spot cloud)
  never resizes through the real API: without SPOT_COMPUTE_ENDPOINT it resizes nothing, so a laptop's
  ADC can never stop a real deployment whose names the stand-in happens to carry.

Nothing here imports torch: the launcher and `make deploy` use it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from harness.checkpoint.store import Store, StoreError
from harness.checkpoint.tiers import Tier, build_tiers, durable
from harness.config import checkpoint_config
from harness.preemption import gce_metadata as metadata

if TYPE_CHECKING:
    from google.auth.transport.requests import AuthorizedSession
    from omegaconf import DictConfig

RECORD = "finished.json"
GROUPS_KEY = "spot-instance-groups"
ENDPOINT_ENV = "SPOT_COMPUTE_ENDPOINT"
DEFAULT_ENDPOINT = "https://compute.googleapis.com/compute/v1"
RESIZE_PERMISSION = "compute.instanceGroupManagers.update"
RESIZE_RETRY_S = 30.0
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
GROUP_PATH = re.compile(rf"projects/({_SEGMENT})/(regions|zones)/({_SEGMENT})/instanceGroupManagers/({_SEGMENT})")
_METADATA_TRIES = 3


class ResizeError(RuntimeError):
    """A resize the Compute API did not accept: the message names the group and why."""


@dataclass(frozen=True)
class Finished:
    """The `finished` record."""

    step: int
    model_sha256: str
    time: str
    checkpoint_step: int | None
    final_loss: float | None = None

    @classmethod
    def from_record(cls, record: dict, where: str) -> Finished:
        try:
            committed, loss = record.get("checkpoint_step"), record.get("final_loss")
            return cls(int(record["step"]), str(record["model_sha256"]), str(record["time"]),
                       None if committed is None else int(committed), None if loss is None else float(loss))
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{where}: not a finished record ({type(err).__name__}: {err})") from None


def location(store: Store) -> str:
    """Where the record of the job whose durable tier is `store` lives."""
    return f"{store.url.rstrip('/')}/{RECORD}"


def read(store: Store) -> Finished | None:
    """The record in `store`, None when the job has not finished; StoreError when it cannot be read."""
    record = store.read_record(RECORD)
    return None if record is None else Finished.from_record(record, location(store))


def record(store: Store, step: int, model_sha256: str, final_loss: float | None = None) -> Finished:
    """Write the record of a job that finished at `step` into its durable tier `store`."""
    committed = store.committed_steps()
    done = Finished(step, model_sha256, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    committed[-1] if committed else None, final_loss)
    store.write_record(RECORD, asdict(done))
    return done


def job_finished(tiers: list[Tier], step: int, model_sha256: str, final_loss: float | None = None) -> None:
    """Rank 0 once the summary is written: the record in the durable tier of `tiers`, then every
    instance group to 0. The resize comes even when the record cannot be written: the job is over
    either way (a VM booted later would restore the final step and finish again)."""
    store = durable(tiers).store
    try:
        record(store, step, model_sha256, final_loss)
        print(f"job end: finished at step {step}, recorded in {location(store)}", flush=True)
    except StoreError as err:
        print(f"job end: the finished record was not written: {err}", file=sys.stderr, flush=True)
    _advance_sweep()
    stop_groups()


def already_finished(cfg: DictConfig) -> bool:
    """The launcher's question before torchrun: True (after one line, and the groups resized to 0) when
    the job this config describes is finished."""
    store = durable(build_tiers(checkpoint_config(cfg))).store
    try:
        done = read(store)
    except StoreError as err:
        print(f"launch: {err}; training (a finished job finishes again at once)", file=sys.stderr, flush=True)
        return False
    if done is None or done.step < cfg.train.max_steps:
        return False
    print(f"launch: run {cfg.run.name!r} finished at step {done.step} on {done.time} (model_sha256 "
          f"{done.model_sha256[:12]}..., {location(store)}): not training again; to train further, a higher "
          "train.max_steps (in a deployment with `make deploy ... --resume-finished`)", flush=True)
    _advance_sweep()
    stop_groups()
    return True


def _advance_sweep() -> None:
    """A sweep deployment's queue (harness/sweep/queue.py): start the next jobs before this one's groups
    go to 0. Never raises: the job's result does not depend on it."""
    from harness.sweep import queue

    queue.advance()


# --- the instance groups ----------------------------------------------------------------------------

def group_path(project: str, name: str, *, region: str | None = None, zone: str | None = None) -> str:
    """The resource path of a regional (region=) or zonal (zone=) managed instance group."""
    if (region is None) == (zone is None):
        raise ValueError(f"instance group {name!r}: give a region or a zone, not both or neither")
    path = f"projects/{project}/{f'regions/{region}' if region else f'zones/{zone}'}/instanceGroupManagers/{name}"
    if not GROUP_PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not a resource path of an instance group")
    return path


def format_groups(paths: Iterable[str]) -> str:
    """The value of the `spot-instance-groups` metadata key."""
    return " ".join(paths)


def parse_groups(value: str) -> list[str]:
    """The group paths in a `spot-instance-groups` value; ValueError naming the key when malformed."""
    groups = value.split()
    for path in groups:
        if not GROUP_PATH.fullmatch(path):
            raise ValueError(f"metadata key {GROUPS_KEY}={value!r}: {path!r} is not projects/P/regions/R/"
                             "instanceGroupManagers/N or projects/P/zones/Z/instanceGroupManagers/N")
    return groups


def instance_groups() -> list[str]:
    """This VM's groups, from its metadata; [] off GCE or when the key is not set."""
    for attempt in range(_METADATA_TRIES):
        try:
            value = metadata.attribute(GROUPS_KEY)
            break
        except OSError:
            if attempt == _METADATA_TRIES - 1:
                raise
            time.sleep(1.0)
    return [] if value is None else parse_groups(value)


def stop_groups() -> None:
    """Resize this VM's instance groups to 0, printing what happened to each."""
    try:
        groups = instance_groups()
    except (OSError, ValueError) as err:
        print(f"job end: cannot tell which instance groups to stop ({err}): they keep their size",
              file=sys.stderr, flush=True)
        return
    if not groups:
        return
    if "GCE_METADATA_HOST" in os.environ and not os.environ.get(ENDPOINT_ENV):
        print(f"job end: the metadata server is a stand-in (GCE_METADATA_HOST) and {ENDPOINT_ENV} is unset: "
              "no real instance group is resized", file=sys.stderr, flush=True)
        return
    try:
        session = _session()
    except ResizeError as err:
        print(f"job end: {err}; resize them by hand: " + "; ".join(gcloud_resize(g, 0) for g in groups),
              file=sys.stderr, flush=True)
        return
    for path in groups:
        try:
            resize(path, 0, session=session)
            print(f"job end: {path} resized to 0", flush=True)
        except ResizeError as err:
            print(f"job end: {err}; resize it by hand: {gcloud_resize(path, 0)}", file=sys.stderr, flush=True)


def endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


def resize(path: str, size: int, retry_s: float = RESIZE_RETRY_S, session: AuthorizedSession | None = None) -> dict:
    """Set group `path`'s target size through the Compute API; returns the accepted operation."""
    import requests
    from google.auth.exceptions import GoogleAuthError

    if not GROUP_PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not a resource path of an instance group")
    session = session or _session()
    url = f"{endpoint().rstrip('/')}/{path}/resize"
    deadline, delay = time.monotonic() + retry_s, 1.0
    while True:
        try:
            resp = session.post(url, params={"size": size}, timeout=(5.0, 30.0))
        except (requests.RequestException, GoogleAuthError) as err:
            problem, transient = f"{type(err).__name__}: {err}", True
        else:
            if resp.ok:
                try:
                    operation = resp.json()
                except ValueError:
                    operation = {}  # accepted all the same: the status says so
                if operation.get("error"):
                    raise ResizeError(f"resize of {path} to {size} was refused: {operation['error']}")
                return operation
            code = resp.status_code
            problem, transient = f"HTTP {code} {_message(resp)}", code == 429 or code >= 500
            if code in (401, 403):
                problem += f" (the caller needs {RESIZE_PERMISSION} on the group: infra grants it to the VMs)"
        if not transient or time.monotonic() + delay > deadline:
            raise ResizeError(f"resize of {path} to {size} failed: {problem}")
        time.sleep(delay)
        delay = min(2 * delay, 8.0)


def gcloud_resize(path: str, size: int) -> str:
    """The same resize as a gcloud command line, for a person to run."""
    m = GROUP_PATH.fullmatch(path)
    assert m is not None
    project, kind, where, name = m.groups()
    scope = f"--region={where}" if kind == "regions" else f"--zone={where}"
    return f"gcloud compute instance-groups managed resize {name} --size={size} {scope} --project={project}"


def _session() -> AuthorizedSession:
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import GoogleAuthError
    from google.auth.transport.requests import AuthorizedSession

    if os.environ.get(ENDPOINT_ENV):
        return AuthorizedSession(AnonymousCredentials())
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except GoogleAuthError as err:
        raise ResizeError(f"no credentials for the Compute API: {err}") from None
    return AuthorizedSession(credentials)


def _message(resp) -> str:
    """The API's error message when the body is Google's error JSON, else the start of the body."""
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
