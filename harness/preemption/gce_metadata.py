"""Watch the GCE metadata server for a preemption or maintenance notice, in background threads.

Contract:
- Each watched key is read at once, then long-polled with `wait_for_change=true`, its last ETag and
  `timeout_sec=poll_s`; the client waits `poll_s + CLIENT_MARGIN_S`, so a server that honours
  `timeout_sec` always answers first. A long-poll the client times out anyway (a server or a proxy
  that holds it) is followed by an immediate read, so a change is seen within one client timeout
  whatever happens to the long-poll.
- "Not on GCE" is decided from each thread's first request only, and only when GCE_METADATA_HOST is
  unset: the host name does not resolve or the connection is refused. The thread then ends, so off GCE
  the watcher costs nothing. Every other failure, and every failure after that first request, timeouts
  included, is retried with backoff for as long as the process lives.
- A notice, told to `on_notice(source, kind)` once per key:
  `instance/preempted` = TRUE: ("metadata:preempted", PREEMPTION);
  `instance/maintenance-event` other than NONE: ("metadata:maintenance-event", kind) with kind
  PREEMPTION on a Spot VM (it is terminated; the MIG recreates it) and MAINTENANCE on an on-demand one
  (a planned stop: the VM restarts after the host event), told apart by `instance/scheduling/preemptible`,
  read once before the first poll (a server that does not serve it is taken for Spot). A live migration
  (MIGRATE_ON_HOST_MAINTENANCE) is no notice: the VM keeps running through it.
- Where it connects: GCE_METADATA_HOST (host[:port]) or metadata.google.internal; `connect_to`
  (host[:port]) replaces only the address the name resolves to, the request still names the host, as
  curl's --connect-to does (the resolver hook tests use to stand a server in for the default name).
- `attribute(name)` reads one instance attribute at once from the same server, with the same "not on
  GCE" rule: None when it is not set or no metadata server is there.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from collections.abc import Callable

from harness.preemption.notice import MAINTENANCE, PREEMPTION

log = logging.getLogger("harness.preemption")

DEFAULT_HOST = "metadata.google.internal"
PREEMPTED = "instance/preempted"
MAINTENANCE_EVENT = "instance/maintenance-event"
PREEMPTIBLE = "instance/scheduling/preemptible"  # TRUE on Spot (and legacy preemptible) VMs
LIVE_MIGRATION = "MIGRATE_ON_HOST_MAINTENANCE"
POLL_S = 60  # timeout_sec of a long-poll (GCE takes whole seconds)
CLIENT_MARGIN_S = 5.0
READ_TIMEOUT_S = 5.0  # an immediate read


class MetadataError(OSError):
    """The server answered, with a status other than 200."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def attribute(name: str, timeout_s: float = READ_TIMEOUT_S) -> str | None:
    """Instance attribute `name` (`instance/attributes/<name>`), read once; None when it is not set
    (404) or, with GCE_METADATA_HOST unset, when no server is there (the name does not resolve, the
    connection is refused). Any other failure raises OSError (MetadataError when it answered)."""
    explicit = "GCE_METADATA_HOST" in os.environ
    conn = http.client.HTTPConnection(os.environ.get("GCE_METADATA_HOST", DEFAULT_HOST), timeout=timeout_s)
    try:
        conn.request("GET", f"/computeMetadata/v1/instance/attributes/{name}", headers={"Metadata-Flavor": "Google"})
        resp = conn.getresponse()
        body = resp.read().decode()
    except (socket.gaierror, ConnectionRefusedError):
        if explicit:
            raise
        return None
    except http.client.HTTPException as err:
        raise MetadataError(0, f"attribute {name}: {err!r}") from None
    finally:
        conn.close()
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise MetadataError(resp.status, f"attribute {name}: HTTP {resp.status} {body[:80]!r}")
    return body


class MetadataWatcher:
    def __init__(self, on_notice: Callable[[str, str], None], *, poll_s: int = POLL_S,
                 client_timeout_s: float | None = None, connect_to: str | None = None,
                 max_backoff_s: float = 30.0):
        self.host = os.environ.get("GCE_METADATA_HOST", DEFAULT_HOST)
        self.explicit_host = "GCE_METADATA_HOST" in os.environ
        self.address = connect_to or self.host
        self.on_notice = on_notice
        self.poll_s = poll_s
        self.client_timeout_s = poll_s + CLIENT_MARGIN_S if client_timeout_s is None else client_timeout_s
        self.max_backoff_s = max_backoff_s
        self.errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(key,), daemon=True,
                                          name=f"metadata-{key.split('/')[-1]}")
                         for key in (PREEMPTED, MAINTENANCE_EVENT)]

    def start(self) -> MetadataWatcher:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def watching(self) -> bool:
        """False once every key's thread has ended: notified, stopped, or not on GCE."""
        return any(t.is_alive() for t in self._threads)

    def _get(self, key: str, etag: str | None) -> tuple[str, str]:
        """The value and ETag of `key`: at once (etag None) or once it differs from `etag`."""
        path = f"/computeMetadata/v1/{key}"
        if etag is not None:
            path += f"?wait_for_change=true&timeout_sec={self.poll_s}" + (f"&last_etag={etag}" if etag else "")
        conn = http.client.HTTPConnection(self.address,
                                          timeout=READ_TIMEOUT_S if etag is None else self.client_timeout_s)
        try:
            conn.request("GET", path, headers={"Host": self.host, "Metadata-Flavor": "Google"})
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise MetadataError(resp.status, f"{key}: HTTP {resp.status} {body[:80]!r}")
        return body, resp.getheader("ETag") or ""

    def _spot(self) -> bool:
        try:
            return self._get(PREEMPTIBLE, None)[0].strip().upper() == "TRUE"
        except MetadataError as err:
            if err.status != 404:
                raise
            log.info("metadata: %s not served; maintenance events count as preemptions", PREEMPTIBLE)
            return True

    def _kind_of(self, key: str, value: str, spot: bool) -> str | None:
        value = value.strip().upper()
        if key == PREEMPTED:
            return PREEMPTION if value == "TRUE" else None
        if value in ("", "NONE"):
            return None
        if value == LIVE_MIGRATION:
            log.info("metadata: live migration announced; the VM keeps running, training goes on")
            return None
        return PREEMPTION if spot else MAINTENANCE

    def _watch(self, key: str) -> None:
        spot: bool | None = None  # maintenance events only: read before the first poll
        etag: str | None = None  # None: the next request is an immediate read
        first, backoff = True, 1.0
        while not self._stop.is_set():
            try:
                if key == MAINTENANCE_EVENT and spot is None:
                    spot = self._spot()
                value, etag = self._get(key, etag)
            except (OSError, http.client.HTTPException) as err:
                absent = isinstance(err, (socket.gaierror, ConnectionRefusedError))
                if first and absent and not self.explicit_host:
                    log.debug("metadata server %s unreachable (%s): not on GCE, not watching", self.address, err)
                    return
                held = etag is not None and isinstance(err, TimeoutError)
                first, etag = False, None
                self.errors += 1
                if self.errors == 1:
                    log.warning("metadata server %s: %s (%s); retrying", self.address, key,
                                f"long-poll held past {self.client_timeout_s:g}s" if held else err)
                if not held:  # a held long-poll already waited: read at once
                    self._stop.wait(backoff)
                    backoff = min(self.max_backoff_s, backoff * 2)
                continue
            first, backoff = False, 1.0
            kind = self._kind_of(key, value, bool(spot))
            if kind is not None:
                self.on_notice(f"metadata:{key.split('/')[-1]}", kind)
                return
