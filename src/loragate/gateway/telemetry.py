"""Prometheus metrics of one gateway app, in its own ``CollectorRegistry``.

Hot-path cost is kept to one counter increment and one or two histogram observations per
request: labelled children are bound once and cached in plain dicts. Gauges that can be read
at scrape time instead (in-flight per replica, replica health, adapter loads) are produced by
a custom collector, so they cost nothing per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class _ScrapeTimeGauges(Collector):
    """Gauges computed from the gateway's state when ``/metrics`` is scraped."""

    def __init__(
        self,
        in_flight: Callable[[], Mapping[str, int]],
        healthy: Callable[[], Mapping[str, bool]],
        adapter_loads: Callable[[], Mapping[str, int]],
    ) -> None:
        self._in_flight = in_flight
        self._healthy = healthy
        self._adapter_loads = adapter_loads

    def collect(self) -> Iterator[Metric]:
        flight = GaugeMetricFamily(
            "loragate_in_flight_requests",
            "Requests the gateway is proxying right now, by replica.",
            labels=["replica"],
        )
        for rid, n in self._in_flight().items():
            flight.add_metric([rid], n)
        yield flight
        up = GaugeMetricFamily(
            "loragate_replica_healthy", "1 if the replica gets traffic, else 0.", labels=["replica"]
        )
        for rid, ok in self._healthy().items():
            up.add_metric([rid], 1.0 if ok else 0.0)
        yield up
        loads = GaugeMetricFamily(
            "loragate_adapter_loads",
            "Adapter loads this gateway made through the admin API, by replica.",
            labels=["replica"],
        )
        for rid, n in self._adapter_loads().items():
            loads.add_metric([rid], n)
        yield loads


class Telemetry:
    """Counters and histograms of the proxy, bound children cached per label set."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._requests = Counter(
            "loragate_requests",
            "Requests by adapter ('' = base model), replica ('' = none chosen) and status.",
            ["adapter", "replica", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "loragate_upstream_latency_seconds",
            "Time from sending a request upstream to the end of its response, by replica.",
            ["replica"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "loragate_ttft_seconds",
            "Streaming requests: time from arrival at the gateway to the first body chunk.",
            ["replica"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._ttft_children: dict[str, Any] = {}

    def bind_state(
        self,
        *,
        in_flight: Callable[[], Mapping[str, int]],
        healthy: Callable[[], Mapping[str, bool]],
        adapter_loads: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry.register(_ScrapeTimeGauges(in_flight, healthy, adapter_loads))

    def count(self, adapter: str, replica: str, status: str) -> None:
        key = (adapter, replica, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(adapter, replica, status)
        child.inc()

    def observe_latency(self, replica: str, seconds: float) -> None:
        child = self._latency_children.get(replica)
        if child is None:
            child = self._latency_children[replica] = self._latency.labels(replica)
        child.observe(seconds)

    def observe_ttft(self, replica: str, seconds: float) -> None:
        child = self._ttft_children.get(replica)
        if child is None:
            child = self._ttft_children[replica] = self._ttft.labels(replica)
        child.observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
