"""Watch the GCE metadata server for a preemption or maintenance notice, in a background thread.

Long-polls `instance/preempted` and `instance/maintenance-event` with `wait_for_change=true`. Off GCE
(the default host does not resolve and GCE_METADATA_HOST is unset) it gives up after the first try,
so it costs nothing per step. When the server is reachable but failing, it retries with backoff.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger("harness.preemption")

DEFAULT_HOST = "metadata.google.internal"
WATCHED = {
    "instance/preempted": lambda v: v.strip().upper() == "TRUE",
    "instance/maintenance-event": lambda v: v.strip().upper() not in ("NONE", ""),
}


class MetadataWatcher:
    def __init__(self, on_notice: Callable[[str], None], poll_timeout_s: float = 60.0,
                 max_backoff_s: float = 30.0):
        self.host = os.environ.get("GCE_METADATA_HOST", DEFAULT_HOST)
        self.explicit_host = "GCE_METADATA_HOST" in os.environ
        self.on_notice = on_notice
        self.poll_timeout_s = poll_timeout_s
        self.max_backoff_s = max_backoff_s
        self.errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(key, is_notice), daemon=True,
                                          name=f"metadata-{key.split('/')[-1]}")
                         for key, is_notice in WATCHED.items()]

    def start(self) -> MetadataWatcher:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _get(self, key: str, etag: str | None) -> tuple[str, str | None]:
        query = "?wait_for_change=true" + (f"&last_etag={etag}" if etag else "")
        url = f"http://{self.host}/computeMetadata/v1/{key}{query if etag is not None else ''}"
        req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        timeout = self.poll_timeout_s + 5 if etag is not None else 5
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode(), resp.headers.get("ETag")

    def _watch(self, key: str, is_notice: Callable[[str], bool]) -> None:
        etag: str | None = None  # None: first read is immediate, then long-poll on changes
        backoff = 1.0
        while not self._stop.is_set():
            try:
                value, new_etag = self._get(key, etag)
                etag = new_etag or ""
                backoff = 1.0
                if is_notice(value):
                    self.on_notice(f"metadata:{key.split('/')[-1]}")
                    return
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                self.errors += 1
                if not self.explicit_host and self.errors <= len(WATCHED):
                    log.debug("metadata server %s unreachable (%s): not on GCE, not watching", self.host, err)
                    return
                if self.errors == 1:
                    log.warning("metadata server %s: %s; retrying with backoff", self.host, err)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
