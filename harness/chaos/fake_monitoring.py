"""A local Cloud Monitoring endpoint: a real gRPC server implementing
`google.monitoring.v3.MetricService/CreateTimeSeries` with the client library's own request types, so
`MetricServiceClient` is exercised end to end (serialization, deadlines, errors) without a network.

    with FakeMonitoring() as fake:
        client = fake.client()
        ...
        fake.requests  # every CreateTimeSeriesRequest received
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from google.cloud import monitoring_v3
from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport
from google.protobuf import empty_pb2

SERVICE = "google.monitoring.v3.MetricService"


class FakeMonitoring:
    def __init__(self, delay_s: float = 0.0, fail_with: grpc.StatusCode | None = None, port: int = 0):
        self.port = port  # 0: any free port; pass a stopped server's port to bring it back
        self.delay_s = delay_s  # answer slowly, to test deadlines
        self.fail_with = fail_with  # answer with this error instead of Empty
        self.requests: list[monitoring_v3.CreateTimeSeriesRequest] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.address = ""

    def __enter__(self) -> FakeMonitoring:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeMonitoring:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "CreateTimeSeries": grpc.unary_unary_rpc_method_handler(
                self._create_time_series,
                request_deserializer=monitoring_v3.CreateTimeSeriesRequest.deserialize,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server, self.address = server, f"127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def client(self, address: str | None = None) -> monitoring_v3.MetricServiceClient:
        """A real client on a plain channel; it reconnects quickly to a server brought back."""
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        channel = grpc.insecure_channel(address or self.address, options=options)
        return monitoring_v3.MetricServiceClient(transport=MetricServiceGrpcTransport(channel=channel))

    def series(self) -> list[monitoring_v3.TimeSeries]:
        with self._lock:
            return [ts for r in self.requests for ts in r.time_series]

    def wait_for(self, n_requests: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= n_requests:
                    return True
            time.sleep(0.02)
        return False

    def _create_time_series(self, request: monitoring_v3.CreateTimeSeriesRequest,
                            context: grpc.ServicerContext) -> empty_pb2.Empty:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            context.abort(self.fail_with, "fake failure")
        with self._lock:
            self.requests.append(request)
        return empty_pb2.Empty()
