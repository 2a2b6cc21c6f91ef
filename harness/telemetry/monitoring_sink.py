"""Job metrics to Cloud Monitoring, where the alert policies of infra/ watch them.

`record()` only stores the latest values in memory; a background thread sends all of them in one
CreateTimeSeries request every `period_s` (Cloud Monitoring accepts a point per series at most every
few seconds; the config insists on >= 10 s). Each request has its own deadline and no library retry:
a failure is counted, logged once, and the next attempt is delayed by exponential back-off, so an
unreachable or slow endpoint never reaches the training loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from harness.telemetry import metric_names as mn
from harness.telemetry.backoff import Backoff, OnError

# record() keyword -> (metric type, value type); every series is a GAUGE on the `global` resource.
METRICS: dict[str, tuple[str, type]] = {
    "goodput": (mn.GOODPUT, float),
    "steps_per_second": (mn.STEPS_PER_SECOND, float),
    "preemptions": (mn.PREEMPTIONS, int),
    "last_step": (mn.LAST_STEP, int),
    "checkpoint_blocking_seconds": (mn.CHECKPOINT_BLOCKING_SECONDS, float),
}
# Cloud Monitoring rejects a second point in a series sooner than this after the previous one.
MIN_SPACING_S = 5.0


class MonitoringSink:
    def __init__(self, project: str, period_s: float, client: Any = None,
                 labels: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 on_error: OnError | None = None, retry_initial_s: float = 5.0, retry_max_s: float = 300.0,
                 endpoint: str | None = None):
        if period_s <= 0:
            raise ValueError(f"period_s={period_s} must be > 0")
        self.project = project
        self.period_s = period_s
        self.labels = dict(labels or {})
        self.timeout_s = timeout_s
        self.backoff = Backoff("monitoring", retry_initial_s, retry_max_s, on_error)
        self.writes = 0
        self._client = client
        self.endpoint = endpoint
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_write = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="monitoring-sink", daemon=True)
        self._thread.start()

    @property
    def errors(self) -> int:
        return self.backoff.errors

    def record(self, **values: float) -> None:
        """Keep the latest value of each metric; sent at the next period. Names: see METRICS."""
        unknown = set(values) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown Monitoring metrics {sorted(unknown)}; known: {sorted(METRICS)}")
        with self._lock:
            self._values.update(values)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Send the final values (unless the last point is too recent) and stop; False on timeout."""
        self._stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.backoff.ready():
                self._write()
        if self.backoff.ready() and time.monotonic() - self._last_write >= MIN_SPACING_S:
            self._write()

    def _write(self) -> None:
        with self._lock:
            values = dict(self._values)
        if not values:
            return
        try:  # the Google client and protobuf load with the first write, one period after the start
            from google.cloud import monitoring_v3

            if self._client is None:
                self._client = make_client(self.endpoint)
            now = time.time()
            series = [self._series(monitoring_v3, name, value, now) for name, value in sorted(values.items())]
            self._client.create_time_series(name=f"projects/{self.project}", time_series=series,
                                            timeout=self.timeout_s, retry=None)
        except Exception as err:
            self.backoff.failed(err)
            return
        self._last_write = time.monotonic()
        self.writes += 1
        self.backoff.succeeded()

    def _series(self, monitoring_v3: Any, name: str, value: float, now: float) -> Any:
        from google.api.metric_pb2 import MetricDescriptor

        metric_type, kind = METRICS[name]
        seconds = int(now)
        is_float = kind is float
        return monitoring_v3.TimeSeries({
            "metric": {"type": metric_type, "labels": self.labels},
            "resource": {"type": "global", "labels": {"project_id": self.project}},
            "metric_kind": MetricDescriptor.MetricKind.GAUGE,
            "value_type": MetricDescriptor.ValueType.DOUBLE if is_float else MetricDescriptor.ValueType.INT64,
            "points": [{"interval": {"end_time": {"seconds": seconds, "nanos": int((now - seconds) * 1e9)}},
                        "value": {"double_value": float(value)} if is_float else {"int64_value": int(value)}}],
        })


def make_client(endpoint: str | None) -> Any:
    """Google's Monitoring API with default credentials, or a plain-text gRPC endpoint (a local server)."""
    from google.cloud import monitoring_v3

    if endpoint is None:
        return monitoring_v3.MetricServiceClient()
    import grpc
    from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport

    channel = grpc.insecure_channel(endpoint)
    return monitoring_v3.MetricServiceClient(transport=MetricServiceGrpcTransport(channel=channel))
