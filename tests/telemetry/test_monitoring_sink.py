"""The Cloud Monitoring sink against a real gRPC server speaking MetricService: well-formed batched
time series with the shared metric names, and a server that dies, stalls or errors never reaching the
caller."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest
from google.api.metric_pb2 import MetricDescriptor

from harness.chaos.fake_monitoring import FakeMonitoring
from harness.telemetry import metric_names
from harness.telemetry.monitoring_sink import METRICS, MonitoringSink


def record_cost_s(sink: MonitoringSink, n: int = 2000) -> list[float]:
    costs = []
    for i in range(n):
        started = time.perf_counter()
        sink.record(last_step=i, goodput=0.5)
        costs.append(time.perf_counter() - started)
    return costs


def test_batched_series_with_shared_names():
    with FakeMonitoring() as fake:
        sink = MonitoringSink("my-project", period_s=0.1, client=fake.client(), labels={"job": "exp1"})
        sink.record(goodput=0.75, steps_per_second=2.5, preemptions=3, last_step=120,
                    checkpoint_blocking_seconds=4.0)
        assert fake.wait_for(1)
        assert sink.close()
    request = fake.requests[0]
    assert request.name == "projects/my-project"
    by_type = {ts.metric.type: ts for ts in request.time_series}
    assert set(by_type) == set(metric_names.ALL)  # one request carries every metric
    goodput = by_type[metric_names.GOODPUT]
    assert goodput.points[0].value.double_value == 0.75
    assert goodput.value_type == MetricDescriptor.ValueType.DOUBLE
    assert goodput.metric_kind == MetricDescriptor.MetricKind.GAUGE
    assert by_type[metric_names.LAST_STEP].points[0].value.int64_value == 120
    assert by_type[metric_names.PREEMPTIONS].value_type == MetricDescriptor.ValueType.INT64
    assert goodput.resource.type == "global" and goodput.resource.labels["project_id"] == "my-project"
    assert dict(goodput.metric.labels) == {"job": "exp1"}
    assert abs(goodput.points[0].interval.end_time.timestamp() - time.time()) < 60
    assert sink.errors == 0 and sink.writes >= 1


def test_latest_values_win_and_nothing_is_sent_before_a_record():
    with FakeMonitoring() as fake:
        sink = MonitoringSink("p", period_s=0.05, client=fake.client())
        time.sleep(0.2)
        assert fake.requests == []
        for step in range(10):
            sink.record(last_step=step)
        assert fake.wait_for(1)
        sink.close()
    assert fake.series()[0].points[0].value.int64_value == 9


def test_unknown_metric_is_a_programming_error():
    sink = MonitoringSink("p", period_s=60, client=object())
    with pytest.raises(ValueError, match="unknown Monitoring metrics"):
        sink.record(loss=1.0)
    sink.close(timeout_s=1)
    assert set(METRICS) >= {"goodput", "steps_per_second", "preemptions", "last_step"}


def test_killed_server_costs_the_caller_nothing_and_writes_resume():
    fake = FakeMonitoring().start()
    sink = MonitoringSink("p", period_s=0.05, client=fake.client(), timeout_s=0.5, retry_initial_s=0.05,
                          retry_max_s=0.2)
    healthy = record_cost_s(sink)
    assert fake.wait_for(1)
    fake.stop()  # killed mid-run
    time.sleep(0.3)
    dead = record_cost_s(sink)
    deadline = time.monotonic() + 5
    while sink.errors < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sink.errors >= 2  # failures counted, retried with back-off
    assert max(dead) < 0.01 and statistics.median(dead) < 10 * statistics.median(healthy) + 1e-5

    with FakeMonitoring(port=fake.port) as revived:  # back on the same address
        assert revived.wait_for(1)
        assert sink.close(timeout_s=2)
    assert sink.writes >= 2


def test_slow_server_is_cut_by_the_deadline_not_the_caller():
    with FakeMonitoring(delay_s=2.0) as fake:
        sink = MonitoringSink("p", period_s=0.05, client=fake.client(), timeout_s=0.2, retry_initial_s=0.05)
        costs = record_cost_s(sink, 500)
        deadline = time.monotonic() + 5
        while sink.errors < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.errors >= 1
        assert max(costs) < 0.01
        sink.close(timeout_s=1)


def test_server_errors_are_counted():
    reported = []
    with FakeMonitoring(fail_with=grpc.StatusCode.PERMISSION_DENIED) as fake:
        sink = MonitoringSink("p", period_s=0.05, client=fake.client(), retry_initial_s=0.05,
                              on_error=lambda sink, error, count: reported.append(error))
        sink.record(goodput=0.1)
        deadline = time.monotonic() + 5
        while not reported and time.monotonic() < deadline:
            time.sleep(0.02)
        sink.close(timeout_s=1)
    assert reported and "PermissionDenied" in reported[0]
