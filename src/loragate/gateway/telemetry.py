"""Prometheus metrics of one gateway app, in its own ``CollectorRegistry``.

Hot-path cost is kept to one counter increment and one or two histogram observations per
request, each a plain dict/list update (no locks, no per-bucket walk); the Prometheus families
are built from them only when ``/metrics`` is scraped. Gauges that can be read at scrape time
(in-flight per replica, replica health, adapter loads) cost nothing per request either.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
            "Requests this gateway instance is proxying right now, by replica. Other "
            "instances' requests are not in it: /admin/replicas 'in_flight' has the count "
            "they share through Redis.",
            labels=["replica"],
        )
        for rid, n in self._in_flight().items():
            flight.add_metric([rid], n)
        yield flight
        up = GaugeMetricFamily(
            "loragate_replica_healthy",
            "1 if this instance sends the replica traffic, else 0 (its last poll or a request "
            "to it failed, or its /v1/models lacks the base model: /admin/replicas "
            "last_error says why).",
            labels=["replica"],
        )
        for rid, ok in self._healthy().items():
            up.add_metric([rid], 1.0 if ok else 0.0)
        yield up
        loads = GaugeMetricFamily(
            "loragate_adapter_loads",
            "Adapters this gateway instance loaded on the replica (vLLM's POST "
            "/v1/load_lora_adapter) since it started, by replica. Only grows, though typed "
            "a gauge: use increase(); other instances count their own.",
            labels=["replica"],
        )
        for rid, n in self._adapter_loads().items():
            loads.add_metric([rid], n)
        yield loads


class _RefusalCounter(Collector):
    """Adapter loads the replicas refused, read when ``/metrics`` is scraped."""

    def __init__(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "loragate_adapter_load_refusals",
            "Adapter loads a replica refused to this gateway instance (vLLM's error on "
            "/v1/load_lora_adapter: no --enable-lora, a rank above --max-lora-rank, a folder "
            "it cannot read), by adapter and replica. Each keeps the replica out of that "
            "adapter's candidates for poller.adapter_refusal_ttl_s, on every instance.",
            labels=["adapter", "replica"],
        )
        for (adapter, replica), n in self._counts().items():
            refused.add_metric([adapter, replica], n)
        yield refused


class _StateGauges(Collector):
    """The shared state store's health, read when ``/metrics`` is scraped."""

    def __init__(
        self,
        degraded: Callable[[], bool],
        errors: Callable[[], int],
        resync_counts: Callable[[], Mapping[str, int]],
    ) -> None:
        self._degraded = degraded
        self._errors = errors
        self._resync_counts = resync_counts

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "loragate_state_degraded",
            "1 while the shared state (Redis) is unreachable and routing uses the local view.",
            value=1.0 if self._degraded() else 0.0,
        )
        yield CounterMetricFamily(
            "loragate_state_errors",
            "Failed calls to the shared state backend (Redis) since start. While degraded "
            "only reconnection attempts are made (backing off to one every 5-6 s): alert on "
            "loragate_state_degraded, not on this rate.",
            value=self._errors(),
        )
        counts = self._resync_counts()
        yield CounterMetricFamily(
            "loragate_state_resyncs",
            "Resynchronisations with the shared state backend (Redis) after an outage.",
            value=counts.get("resyncs", 0),
        )
        yield CounterMetricFamily(
            "loragate_state_journal_dropped",
            "Writes made while Redis was unreachable that were dropped, not replayed "
            "(journal full, or still arriving when a resync ended).",
            value=counts.get("journal_dropped", 0),
        )


class _Histogram:
    """One label set of a histogram: per-bucket counts (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0


class _ProxyMetrics(Collector):
    """The per-request counters and histograms, as plain ints and floats (one event loop, no
    locks), turned into Prometheus families only when ``/metrics`` is scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.http_errors: dict[str, int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "loragate_requests",
            "Requests this gateway instance answered, by adapter ('' = base model), replica "
            "('' = none chosen) and status: the HTTP status sent, or client_closed (the "
            "client left first), stream_error (the replica broke off a started stream), "
            "shutdown (a stream cut at the shutdown deadline). A request retried on another "
            "replica counts once, with the replica that answered it.",
            labels=["adapter", "replica", "status"],
        )
        for labels, n in self.requests.items():
            requests.add_metric(list(labels), n)
        yield requests
        http_errors = CounterMetricFamily(
            "loragate_http_errors",
            "Requests answered by the HTTP server itself, before or instead of any handler: "
            "parser rejections (400, 413, 431) and handlers that raised (500), by status.",
            labels=["status"],
        )
        for status, n in self.http_errors.items():
            http_errors.add_metric([status], n)
        yield http_errors
        yield _histogram_family(
            "loragate_upstream_latency_seconds",
            "Time from sending a request upstream to the end of its response, by replica "
            "(responses a replica sent, its errors included; attempts that got no response "
            "and answers the client left are not observed).",
            self.latency,
        )
        yield _histogram_family(
            "loragate_ttft_seconds",
            "Streaming requests: time from arrival at the gateway to the first body chunk "
            "relayed (routing, any adapter load and the replica's queue included), by "
            "replica.",
            self.ttft,
        )


def _histogram_family(name: str, doc: str, series: Mapping[str, _Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["replica"])
    bounds = [repr(b) for b in _LATENCY_BUCKETS_S] + ["+Inf"]  # "0.005", "1.0": Prometheus' own
    for replica, hist in series.items():
        cumulative = list(itertools.accumulate(hist.counts))
        family.add_metric(
            [replica], list(zip(bounds, cumulative, strict=True)), sum_value=hist.total
        )
    return family


class Telemetry:
    """Counters and histograms of the proxy.

    Per request this is a dict update and a ``bisect`` into the bucket bounds: the Prometheus
    client's own ``Counter``/``Histogram`` children take a lock and walk every bucket on each
    call, several times dearer, for values nobody reads between scrapes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = _ProxyMetrics()
        self.registry.register(self._metrics)
        self._requests = self._metrics.requests
        self._latency = self._metrics.latency
        self._ttft = self._metrics.ttft

    def bind_state(
        self,
        *,
        in_flight: Callable[[], Mapping[str, int]],
        healthy: Callable[[], Mapping[str, bool]],
        adapter_loads: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry.register(_ScrapeTimeGauges(in_flight, healthy, adapter_loads))

    def bind_refusals(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Refused adapter loads by (adapter, replica), counted since start."""
        self.registry.register(_RefusalCounter(counts))

    def bind_shared_state(
        self,
        *,
        degraded: Callable[[], bool],
        errors: Callable[[], int],
        resync_counts: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.registry.register(_StateGauges(degraded, errors, resync_counts))

    def count(self, adapter: str, replica: str, status: str) -> None:
        key = (adapter, replica, status)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1

    def count_http_error(self, status: int) -> None:
        """One request the HTTP layer answered itself (see ``gateway/protocol_errors.py``)."""
        key = str(status)
        errors = self._metrics.http_errors
        errors[key] = errors.get(key, 0) + 1

    def observe_latency(self, replica: str, seconds: float) -> None:
        hist = self._latency.get(replica)
        if hist is None:
            hist = self._latency[replica] = _Histogram(len(_LATENCY_BUCKETS_S))
        hist.counts[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
        hist.total += seconds

    def observe_ttft(self, replica: str, seconds: float) -> None:
        hist = self._ttft.get(replica)
        if hist is None:
            hist = self._ttft[replica] = _Histogram(len(_LATENCY_BUCKETS_S))
        hist.counts[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
        hist.total += seconds

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
