"""The metadata watcher against the local cloud's fake metadata server, as GCE serves it: long-polls
held past the client's timeout, "not on GCE" only from the first read, and the kind of a maintenance
notice on Spot and on-demand VMs. GCE_METADATA_HOST is unset in every test (as on GCE); the default
host name is pointed at the fake with the watcher's `connect_to`."""

from __future__ import annotations

import threading

import pytest

from harness.chaos import fake_metadata as fake_server
from harness.chaos.fake_metadata import FakeMetadata
from harness.preemption import MAINTENANCE, PREEMPTION
from harness.preemption.gce_metadata import DEFAULT_HOST, MAINTENANCE_EVENT, PREEMPTED, PREEMPTIBLE, MetadataWatcher
from tests import runs


class Notices:
    def __init__(self):
        self.got: list[tuple[str, str]] = []
        self.arrived = threading.Event()

    def __call__(self, source: str, kind: str) -> None:
        self.got.append((source, kind))
        self.arrived.set()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    server = FakeMetadata()
    yield server
    server.close()


def long_polls(fake: FakeMetadata, key: str) -> list[str]:
    return [p for p in list(fake.requests) if p.startswith(f"/computeMetadata/v1/{key}?wait_for_change=true")]


def test_notice_after_two_long_polls_held_past_the_client_timeout_is_seen(fake):
    # The fake holds every long-poll for LONG_POLL_S whatever timeout_sec asks; the client gives up sooner.
    client_timeout_s = fake_server.LONG_POLL_S / 2
    notices = Notices()
    watcher = MetadataWatcher(notices, poll_s=1, client_timeout_s=client_timeout_s, connect_to=fake.host).start()
    try:
        assert watcher.host == DEFAULT_HOST and not watcher.explicit_host
        runs.wait_for(lambda: len(long_polls(fake, PREEMPTED)) >= 3, timeout=30, interval=0.05,
                      what="two long-polls held past the client timeout and a third one")
        assert not notices.got and watcher.watching, "a held long-poll was taken for 'not on GCE'"
        fake.preempt()
        assert notices.arrived.wait(timeout=3 * client_timeout_s + 2), "the notice was missed"
    finally:
        watcher.stop()
    assert notices.got == [("metadata:preempted", PREEMPTION)]
    assert all("timeout_sec=1" in p for p in long_polls(fake, PREEMPTED))
    assert watcher.errors >= 2


@pytest.mark.parametrize(("preemptible", "kind"), [("TRUE", PREEMPTION), ("FALSE", MAINTENANCE),
                                                    (None, PREEMPTION)])
def test_maintenance_event_is_a_preemption_on_spot_and_a_planned_stop_on_demand(fake, preemptible, kind):
    if preemptible is not None:
        fake.set(PREEMPTIBLE, preemptible)
    notices = Notices()
    watcher = MetadataWatcher(notices, poll_s=1, connect_to=fake.host).start()
    try:
        runs.wait_for(lambda: long_polls(fake, MAINTENANCE_EVENT), timeout=10, interval=0.02, what="a long-poll")
        fake.set(MAINTENANCE_EVENT, "MIGRATE_ON_HOST_MAINTENANCE")  # live migration: the VM keeps running
        assert not notices.arrived.wait(timeout=1.0), notices.got
        fake.set(MAINTENANCE_EVENT, "TERMINATE_ON_HOST_MAINTENANCE")
        assert notices.arrived.wait(timeout=5)
    finally:
        watcher.stop()
    assert notices.got == [("metadata:maintenance-event", kind)]
    assert f"/computeMetadata/v1/{PREEMPTIBLE}" in fake.requests


@pytest.mark.parametrize("address", ["metadata.invalid", "closed port"])
def test_no_server_at_the_first_read_means_not_on_gce(monkeypatch, address):
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)
    target = f"127.0.0.1:{runs.free_port()}" if address == "closed port" else address
    watcher = MetadataWatcher(Notices(), connect_to=target).start()
    runs.wait_for(lambda: not watcher.watching, timeout=10, interval=0.02, what="the watcher to give up")
    assert watcher.errors == 0


def test_a_server_that_goes_away_after_the_first_read_is_retried(fake):
    watcher = MetadataWatcher(Notices(), poll_s=1, client_timeout_s=1.5, max_backoff_s=0.2,
                              connect_to=fake.host).start()
    try:
        runs.wait_for(lambda: long_polls(fake, PREEMPTED), timeout=10, interval=0.02, what="a long-poll")
        fake.close()  # connections are refused from now on
        runs.wait_for(lambda: watcher.errors >= 4, timeout=30, interval=0.05, what="retries")
        assert watcher.watching
    finally:
        watcher.stop()


def test_explicit_host_is_retried_even_when_refused_at_first(monkeypatch):
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{runs.free_port()}")
    watcher = MetadataWatcher(Notices(), max_backoff_s=0.2).start()
    try:
        runs.wait_for(lambda: watcher.errors >= 4, timeout=30, interval=0.05, what="retries")
        assert watcher.watching
    finally:
        watcher.stop()
