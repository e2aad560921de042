"""Prometheus metrics of one gateway app, in its own ``CollectorRegistry``.

Hot-path cost is kept to one counter increment and a few histogram observations per request
(its upstream latency; its duration as the client saw it, a 2xx's also by adapter and tenant;
a stream's TTFT, whose one bound search serves the per-replica, per-residency, per-adapter and
per-tenant series, and its whole duration), each a plain dict/list update (no locks, no
per-bucket walk, no call per series), plus, for a request for an adapter, one
increment of the residency its replica had (``count_residency``). The adapter and tenant label
values are folded (``label_fold.LabelFold``: ``metrics.adapter_labels``,
``metrics.tenant_labels``) as they are counted, so the series, and the dicts holding them,
stay bounded. The Prometheus families are built from them only when
``/metrics`` is scraped (the durations merged into status classes then). Gauges that can be
read at scrape time (in-flight per replica, this instance's and the shared view, replica health
and draining, adapter loads, what routing sees of each replica: shadow residency occupancy,
queue depth and KV usage of its last poll) cost nothing per request either. The registry also
carries the process collectors (``process_start_time_seconds``,
``process_resident_memory_bytes``, ``python_info``, ...), as prometheus_client's default
registry does.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import platform
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Literal, TypeVar

import aiohttp
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from loragate import __version__
from loragate.backends.lora_off import CAUSES as LORA_OFF_CAUSES
from loragate.backends.pool_types import POLL_FAILURE_REASONS
from loragate.core.config import RoutingConfig
from loragate.core.errors import AdapterLoadError, UpstreamConnectError, UpstreamError
from loragate.core.types import ReplicaId, ReplicaSnapshot, Residency
from loragate.gateway.label_fold import LabelFold
from loragate.routing.resolved import routing_sha256 as _section_sha256
from loragate.state.residency import capacities

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_K = TypeVar("_K")

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

_RELOAD_RESULTS = ("ok", "rejected", "error")  # loragate_config_reloads_total{result}

# loragate_routing_residency_total{replica,residency}: where the shadow residency had the
# adapter on the replica routing chose (a GPU slot, the CPU cache, registered only, or not
# registered: a load follows).
AdapterResidency = Literal["gpu", "cpu", "registered", "unregistered"]
RESIDENCIES: tuple[AdapterResidency, ...] = ("gpu", "cpu", "registered", "unregistered")
# The residency label of the latency histograms (loragate_ttft_by_residency_seconds,
# loragate_request_duration_seconds): one of RESIDENCIES at the request's last routing decision,
# BASE for a request for the base model (no adapter to find), NOT_ROUTED for one that ended
# before any replica was chosen.
# Typed (mypy checks them): ``observe_ttft``'s label indexes a histogram made for each of
# ROUTED_RESIDENCIES, so only a RoutedResidency may reach it; NOT_ROUTED is for the
# request counters' label (ResidencyLabel) alone.
BASE: Final = "base"
NOT_ROUTED: Final = "none"
RoutedResidency = AdapterResidency | Literal["base"]
ResidencyLabel = RoutedResidency | Literal["none"]
ROUTED_RESIDENCIES: tuple[RoutedResidency, ...] = (*RESIDENCIES, BASE)

# loragate_endpoint_errors_total{endpoint}: the gateway's own endpoints by class (never the raw
# path: a client could make the series unbounded) and, shown from 0, the failed
# authentications an alert would watch.
ENDPOINT_CLASSES = ("admin", "models", "metrics", "health", "api", "other")
_AUTH_ENDPOINTS = ("admin", "models", "metrics")

# The end of the HELP of every family with an adapter or tenant label.
_ADAPTER_LABEL_DOC = (
    "The adapter label follows metrics.adapter_labels: with first_n (the default) the first "
    "metrics.adapter_label_limit adapters (20) have their own value (the config file's first, "
    "in file order, then those this instance counted first) and any other is __other__; "
    "listed: the adapters of metrics.adapter_label_names, any other __other__; "
    "all: every adapter; none: __other__ for every adapter."
)
_TENANT_LABEL_DOC = (
    "tenant: the API key's tenant ('' when the config has no tenants); the label follows "
    "metrics.tenant_labels (first_n, limit metrics.tenant_label_limit, 20; listed, "
    "metrics.tenant_label_names; all; none) as "
    "the adapter label follows metrics.adapter_labels."
)


class _ScrapeTimeGauges(Collector):
    """Gauges computed from the gateway's state when ``/metrics`` is scraped."""

    def __init__(
        self,
        in_flight: Callable[[], Mapping[str, int]],
        healthy: Callable[[], Mapping[str, bool]],
        adapter_loads: Callable[[], Mapping[str, int]],
        shared_in_flight: Callable[[], Mapping[str, int]] | None,
    ) -> None:
        self._in_flight = in_flight
        self._healthy = healthy
        self._adapter_loads = adapter_loads
        self._shared_in_flight = shared_in_flight

    def collect(self) -> Iterator[Metric]:
        flight = GaugeMetricFamily(
            "loragate_in_flight_requests",
            "Requests this gateway instance is proxying right now, by replica. Other "
            "instances' requests are not in it: loragate_shared_in_flight_requests has the "
            "count all instances share through Redis. A replica a reload removed is listed "
            "while requests of this instance still run on it.",
            labels=["replica"],
        )
        for rid, n in self._in_flight().items():
            flight.add_metric([rid], n)
        yield flight
        if self._shared_in_flight is not None:
            shared = GaugeMetricFamily(
                "loragate_shared_in_flight_requests",
                "Requests in flight on the replica through every gateway instance, as this "
                "instance sees them in the shared state (Redis; refreshed every "
                "state.refresh_s, the last view while degraded; the same as "
                "loragate_in_flight_requests with the embedded store). What routing uses; "
                "/admin/replicas 'in_flight'. A replica a reload removed is listed while "
                "requests of this instance still run on it.",
                labels=["replica"],
            )
            for rid, n in self._shared_in_flight().items():
                shared.add_metric([rid], n)
            yield shared
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
        loads = CounterMetricFamily(
            "loragate_adapter_loads",
            "Adapters this gateway instance loaded on the replica (vLLM's POST "
            "/v1/load_lora_adapter answered 200) since it started, by replica; other "
            "instances count their own. A reload that replaces the replica (URL, key or "
            "settings changed) keeps the count; a replica a reload removed keeps its last "
            "value, and counts on from it if it comes back.",
            labels=["replica"],
        )
        for rid, n in self._adapter_loads().items():
            loads.add_metric([rid], n)
        yield loads


class _LabelNames(Collector):
    """How many adapters and tenants have their own label value, read at scrape time."""

    def __init__(self, folds: Mapping[str, LabelFold]) -> None:
        self._folds = folds

    def collect(self) -> Iterator[Metric]:
        names = GaugeMetricFamily(
            "loragate_metric_label_names",
            "Adapters (label=adapter) and tenants (label=tenant) this instance counted in "
            "its metrics, by whether they have their own label value (own) or were folded "
            "into __other__ (other), as metrics.adapter_labels / metrics.tenant_labels say. "
            "other above 0 with first_n: that many are in the __other__ series; raising "
            "metrics.adapter_label_limit (or tenant_label_limit; a restart) names them, at "
            "about 35 series each for adapters (2 histograms and the request counters).",
            labels=["label", "kind"],
        )
        for label, fold in self._folds.items():
            own, other = fold.counts()
            names.add_metric([label, "own"], own)
            names.add_metric([label, "other"], other)
        yield names


class _BuildInfo(Collector):
    """``loragate_build_info``: the same at every scrape, built once."""

    def __init__(self) -> None:
        info = GaugeMetricFamily(
            "loragate_build_info",
            "1, labelled with the loragate version this gateway instance runs and the version "
            "of the Python running it (python_info has the interpreter's details): instances of a "
            "fleet that run different releases differ here.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        self._families = (info,)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class _DrainingGauge(Collector):
    """Which replicas are being drained, read when ``/metrics`` is scraped."""

    def __init__(self, draining: Callable[[], Mapping[str, bool]]) -> None:
        self._draining = draining

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "loragate_replica_draining",
            "1 while the replica is drained (POST /admin/replicas/{id}/drain, on any gateway "
            "instance sharing the state store: seen here within state.refresh_s): no new "
            "requests are routed there, those under way finish; else 0.",
            labels=["replica"],
        )
        for rid, on in self._draining().items():
            gauge.add_metric([rid], 1.0 if on else 0.0)
        yield gauge


class _LoraOffGauge(Collector):
    """Which replicas serve no adapters, and why, read when ``/metrics`` is scraped."""

    def __init__(self, causes: Callable[[], Mapping[str, str | None]]) -> None:
        self._causes = causes

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "loragate_replica_lora_off",
            "1 while this instance found the replica serving no adapters, by cause: "
            "lora_disabled (started without --enable-lora: no adapter request goes there), "
            "no_runtime_loading (its POST /v1/load_lora_adapter is a 404: "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True missing; only the adapters it lists go "
            "there); else 0. Base-model requests still go there. Checked again every "
            "poller.adapter_refusal_ttl_s and when it restarts; /admin/replicas lora_off.",
            labels=["replica", "cause"],
        )
        for rid, found in self._causes().items():
            for cause in LORA_OFF_CAUSES:
                gauge.add_metric([rid, cause], 1.0 if found == cause else 0.0)
        yield gauge


class _RefusalCounter(Collector):
    """Adapter loads the replicas refused, read when ``/metrics`` is scraped (by the adapter's
    label value: ``adapter_label``)."""

    def __init__(
        self,
        counts: Callable[[], Mapping[tuple[str, str], int]],
        adapter_label: Callable[[str], str],
    ) -> None:
        self._counts = counts
        self._adapter_label = adapter_label

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "loragate_adapter_load_refusals",
            "Adapter loads a replica refused to this gateway instance (vLLM's error on "
            "/v1/load_lora_adapter: a rank above --max-lora-rank, a folder it cannot read; "
            "not a replica that serves no adapters: loragate_replica_lora_off), by adapter and "
            "replica. Each keeps the replica out of that "
            "adapter's candidates for poller.adapter_refusal_ttl_s, on every instance. "
            + _ADAPTER_LABEL_DOC,
            labels=["adapter", "replica"],
        )
        label = self._adapter_label
        folded: dict[tuple[str, str], int] = {}
        for (adapter, replica), n in self._counts().items():
            key = (label(adapter), replica)
            folded[key] = folded.get(key, 0) + n
        for key, n in folded.items():
            refused.add_metric(list(key), n)
        yield refused


class _StateGauges(Collector):
    """The shared state store's health, read when ``/metrics`` is scraped."""

    def __init__(
        self,
        degraded: Callable[[], bool],
        errors: Callable[[], int],
        resync_counts: Callable[[], Mapping[str, int]],
        definition_conflicts: Callable[[], int],
    ) -> None:
        self._degraded = degraded
        self._errors = errors
        self._resync_counts = resync_counts
        self._definition_conflicts = definition_conflicts

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "loragate_state_degraded",
            "1 while the shared state (Redis) is unreachable and routing uses the local view; "
            "also for a blip (a call timed out, Redis answering again within "
            "state.outage_warning_s): alert on it lasting that long (for: 2s by default), or "
            "on the 'Redis unreachable' WARNING.",
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
            "Resynchronisations with the shared state backend (Redis) after an outage (one "
            "with its 'Redis unreachable' WARNING).",
            value=counts.get("resyncs", 0),
        )
        yield CounterMetricFamily(
            "loragate_state_blips",
            "Redis calls that timed out with Redis answering again within "
            "state.outage_warning_s (a slow Redis, or this instance's event loop held up): "
            "routed from the local view meanwhile and resynchronised, logged at INFO, not an "
            "outage.",
            value=counts.get("blips", 0),
        )
        yield CounterMetricFamily(
            "loragate_state_journal_dropped",
            "Writes made while Redis was unreachable that were dropped, not replayed "
            "(journal full, or still arriving when a resync ended).",
            value=counts.get("journal_dropped", 0),
        )
        yield GaugeMetricFamily(
            "loragate_adapter_definition_conflicts",
            "Adapters of this instance's config file that it serves with another definition "
            "(path, rank) than its file's, because another one is in force for every instance "
            "on the state store (another instance's file defined the name first, or it was "
            "registered through the admin API before). 0 when the files agree. An ERROR log "
            "line, GET /admin/adapters (definition_conflict) and /health name them.",
            value=self._definition_conflicts(),
        )


class _ReplicaView(Collector):
    """What routing sees of each replica, read when ``/metrics`` is scraped: the shadow
    residency's occupancy and the load signals of the replica's last successful poll; and how
    many gateway instances share the state store."""

    def __init__(
        self,
        snapshots: Callable[[], Iterable[ReplicaSnapshot]],
        residency_of: Callable[[ReplicaId], Residency],
        instances: Callable[[], int | None] | None,
    ) -> None:
        self._snapshots = snapshots
        self._residency_of = residency_of
        self._instances = instances

    def collect(self) -> Iterator[Metric]:
        adapters = GaugeMetricFamily(
            "loragate_replica_adapters",
            "Adapters the replica holds by the shadow residency (the model routing decides "
            "by, shared by every instance; vLLM 0.32 does not report it), by tier: gpu (in a "
            "GPU slot), cpu (in the CPU cache, those in a GPU slot included, as vLLM's LRU "
            "cache holds them), registered (known to the replica: /v1/models, and the loads "
            "of the gateways). Compare with loragate_replica_adapter_slots.",
            labels=["replica", "tier"],
        )
        slots = GaugeMetricFamily(
            "loragate_replica_adapter_slots",
            "The replica's adapter capacity by tier: gpu (--max-loras), cpu (--max-cpu-loras, "
            "at least --max-loras), from its config's settings, else from its "
            "vllm:lora_requests_info (max_lora) and vLLM's defaults.",
            labels=["replica", "tier"],
        )
        queue = GaugeMetricFamily(
            "loragate_replica_requests",
            "The replica's requests by state at its last successful poll (vLLM's /metrics): "
            "running (vllm:num_requests_running), waiting (vllm:num_requests_waiting), "
            "deferred (of the waiting, those held back by the LoRA slot budget: "
            'vllm:num_requests_waiting_by_reason{reason="deferred"}). Sums over engines.',
            labels=["replica", "state"],
        )
        kv = GaugeMetricFamily(
            "loragate_replica_kv_cache_usage_ratio",
            "The replica's KV-cache usage (0-1; vllm:kv_cache_usage_perc, averaged over "
            "engines) at its last successful poll.",
            labels=["replica"],
        )
        residency_of = self._residency_of
        for snap in self._snapshots():
            rid = snap.replica_id
            res = residency_of(rid)
            adapters.add_metric([rid, "gpu"], len(res.gpu))
            adapters.add_metric([rid, "cpu"], len(res.cpu))
            adapters.add_metric([rid, "registered"], len(res.registered))
            gpu_slots, cpu_slots = capacities(snap.settings)
            slots.add_metric([rid, "gpu"], gpu_slots)
            slots.add_metric([rid, "cpu"], cpu_slots)
            queue.add_metric([rid, "running"], snap.num_running)
            queue.add_metric([rid, "waiting"], snap.num_waiting)
            queue.add_metric([rid, "deferred"], snap.num_deferred)
            kv.add_metric([rid], snap.kv_usage)
        yield from (adapters, slots, queue, kv)
        n = self._instances() if self._instances is not None else None
        if n is not None:
            yield GaugeMetricFamily(
                "loragate_gateway_instances",
                "Gateway instances sharing this state store (Redis) that read it lately, this "
                "one included: those whose last read of the shared state is at most "
                "max(3 x state.refresh_s, 5 s) old, as of this instance's last refresh (Redis "
                "keeps each instance's last read); 1 with the embedded store (one instance). "
                "Not shown while this instance is degraded.",
                value=n,
            )


class _Histogram:
    """One label set of a histogram: per-bucket counts (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0


def _new() -> _Histogram:
    return _Histogram(len(_LATENCY_BUCKETS_S))


class _ProxyMetrics(Collector):
    """The per-request counters and histograms, as plain ints and floats (one event loop, no
    locks), turned into Prometheus families only when ``/metrics`` is scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokenizer: dict[tuple[str, str, str], int] = {}  # (endpoint, replica, status)
        self.http_errors: dict[str, int] = {}
        self.header_timeouts = 0
        self.endpoint_errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}
        # By residency (one of ROUTED_RESIDENCIES: all there from the start, shown from 0).
        self.ttft_residency: dict[RoutedResidency, _Histogram] = {
            r: _Histogram(len(_LATENCY_BUCKETS_S)) for r in ROUTED_RESIDENCIES
        }
        # (status or outcome, residency): turned into status classes at scrape time.
        self.duration: dict[tuple[str, str], _Histogram] = {}
        # (The same, of streams; and by label value, folded: see label_fold.py. A missing
        # key makes its histogram: a hit costs no Python call.)
        self.stream_duration: defaultdict[tuple[str, str], _Histogram] = defaultdict(_new)
        self.ttft_adapter: defaultdict[str, _Histogram] = defaultdict(_new)
        self.ttft_tenant: defaultdict[str, _Histogram] = defaultdict(_new)
        self.duration_adapter: defaultdict[str, _Histogram] = defaultdict(_new)
        self.duration_tenant: defaultdict[str, _Histogram] = defaultdict(_new)
        self.retries: dict[tuple[str, str], int] = {}
        self.reloads: dict[str, int] = {}
        self.config: tuple[str, str] | None = None  # (policy, sha256 of the routing section)
        self.residency: dict[tuple[str, str], int] = {}  # (replica, one of RESIDENCIES)
        self.poll_failures: dict[tuple[str, str], int] = {}  # (replica, reason)
        self.load_duration: dict[tuple[str, str], _Histogram] = {}  # (replica, result)
        self.load_wait: dict[str, _Histogram] = {}
        # The pool's replicas now: their residency and poll-failure series are shown from 0,
        # and stay (at their last value) once a reload removed the replica: a counter's series
        # does not vanish. (Every replica ever seen, in order.)
        self.replica_ids: Callable[[], Iterable[str]] = tuple
        self._replicas_seen: dict[str, None] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "loragate_requests",
            "Requests this gateway instance answered, by adapter ('' = base model), replica "
            "('' = none chosen) and status: the HTTP status sent, or client_closed (the "
            "client left first), stream_error (the replica broke off a started stream, or "
            "ended it with its own error event, with finish_reason abort, or with neither a "
            "token nor a finish reason), "
            "shutdown (a stream cut at the shutdown deadline). A request retried on another "
            "replica counts once, with the replica that answered it (the failed attempt is "
            "in loragate_upstream_retries_total). " + _ADAPTER_LABEL_DOC,
            labels=["adapter", "replica", "status"],
        )
        for labels, n in self.requests.items():
            requests.add_metric(list(labels), n)
        yield requests
        tokenizer = CounterMetricFamily(
            "loragate_tokenizer_requests",
            "Requests of vLLM's own endpoints this gateway instance answered (not in "
            "loragate_requests_total: no generation, no in-flight lease), by endpoint "
            "(tokenize: POST /tokenize, detokenize: POST /detokenize, version: GET /version), "
            "replica ('' = none chosen) and status: the HTTP status sent, or client_closed.",
            labels=["endpoint", "replica", "status"],
        )
        for labels, n in self.tokenizer.items():
            tokenizer.add_metric(list(labels), n)
        yield tokenizer
        http_errors = CounterMetricFamily(
            "loragate_http_errors",
            "Requests answered by the HTTP server itself, before or instead of any handler: "
            "parser rejections (400, 413, 431; 415: a Content-Encoding it cannot decode, br or "
            "zstd) and handlers that raised (500), by status.",
            labels=["status"],
        )
        for status, n in self.http_errors.items():
            http_errors.add_metric([status], n)
        yield http_errors
        yield CounterMetricFamily(
            "loragate_client_header_timeouts",
            "Client connections closed because no complete request head arrived within "
            "limits.client_header_timeout_s (from the connection's start, or from the first "
            "byte of a later request head).",
            value=self.header_timeouts,
        )
        endpoint_errors = CounterMetricFamily(
            "loragate_endpoint_errors",
            "Error answers (status >= 400) of the gateway's own endpoints, not of proxied "
            "requests (those are in loragate_requests_total) nor of the HTTP parser "
            "(loragate_http_errors_total), by endpoint class and status: admin (/admin/*), "
            "models (GET /v1/models), metrics (/metrics), health, api (another /v1 path or a "
            "method the path does not take), other (any other path). 401 is a failed "
            "authentication (a missing or wrong bearer token: the admin token, a tenant's API "
            "key, the metrics token); 404 an unknown path (or, under /admin, replica or "
            "adapter); 405 a wrong method.",
            labels=["endpoint", "status"],
        )
        for endpoint in _AUTH_ENDPOINTS:  # from 0: increase() sees the first failure too
            if (endpoint, "401") not in self.endpoint_errors:
                endpoint_errors.add_metric([endpoint, "401"], 0)
        for (endpoint, status), n in self.endpoint_errors.items():
            endpoint_errors.add_metric([endpoint, status], n)
        yield endpoint_errors
        retries = CounterMetricFamily(
            "loragate_upstream_retries",
            "Requests this gateway instance sent again after a replica failed them before "
            "any answer reached the client, by the replica that failed and reason: connect "
            "(could not connect), dropped (closed the connection before answering), "
            "bad_response (an answer that is not HTTP), refused_load (refused to load the "
            "adapter), load_failed (the adapter load did not get through: connect, dropped, "
            "or not done within the request's timeout, or the replica stopped listening, or "
            "answering, meanwhile), adapter_missing (answered 404 for an "
            "adapter the gateway had loaded there, e.g. after a restart: routed again, and "
            "the adapter loaded again), "
            "engine_stopped (the replica stopped the request before any answer reached the "
            "client: vLLM's finish_reason abort at shutdown, or its engine-dead 500; or it "
            "stopped listening, or stopped answering its polls, and then sent nothing for "
            "limits.stopped_replica_grace_s), "
            "reload (a config reload removed or replaced the replica's entry while the "
            "request waited for an adapter load there: routed again, its one retry unused, "
            "maybe to the entry that replaced it). "
            "Except after adapter_missing and reload the retry goes to another replica. "
            "loragate_requests_total counts the request once, with the replica that "
            "answered it (POST /tokenize, /detokenize and GET /version: "
            "loragate_tokenizer_requests_total; their adapter_missing is a replica that "
            "answered 404 for an adapter it was thought to hold: asked again as the base "
            "model).",
            labels=["replica", "reason"],
        )
        for (replica, reason), n in self.retries.items():
            retries.add_metric([replica, reason], n)
        yield retries
        reloads = CounterMetricFamily(
            "loragate_config_reloads",
            "Config reloads asked of this instance (POST /admin/reload, SIGHUP), by result: "
            "ok (applied), rejected (bad or missing file: the running config stays, the log "
            "says why), error (failed while applying: see the log).",
            labels=["result"],
        )
        # Every result from 0, "error" too: a series that first appears at 1 hides that
        # reload from increase() and rate() (an alert on errors would miss the first one).
        for result in _RELOAD_RESULTS:
            reloads.add_metric([result], self.reloads.get(result, 0))
        for result, n in self.reloads.items():
            if result not in _RELOAD_RESULTS:
                reloads.add_metric([result], n)
        yield reloads
        if self.config is not None:
            info = GaugeMetricFamily(
                "loragate_config_info",
                "1, labelled with the routing policy this instance runs and the sha256 of its "
                "routing section in canonical form (the policy or composition with every "
                "parameter, defaults filled in, and the seed; as canonical JSON: what loragate "
                "simulate's summary.json has as config.routing.sha256), so that instances "
                "running different policies or parameters differ here, and instances whose "
                "sections are written differently but mean the same do not. Changes on reload.",
                labels=["policy", "sha256"],
            )
            info.add_metric(list(self.config), 1)
            yield info
        yield _histogram_family(
            "loragate_upstream_latency_seconds",
            "Time from sending a request upstream to the end of its response, by replica "
            "(responses a replica sent, its errors included; attempts that got no response "
            "and answers the client left are not observed).",
            ["replica"],
            ((k,) for k in self.latency),
            self.latency.values(),
        )
        yield _histogram_family(
            "loragate_ttft_seconds",
            "Streaming requests: time from arrival at the gateway to the first body chunk "
            "relayed (routing, any adapter load and the replica's queue included), by "
            "replica. While another replica could take the request, the first chunk relayed "
            "is the first with output (a token, a finish reason): the head and a chat's role "
            "chunk wait for it.",
            ["replica"],
            ((k,) for k in self.ttft),
            self.ttft.values(),
        )
        yield _histogram_family(
            "loragate_ttft_by_residency_seconds",
            "Streaming requests: loragate_ttft_seconds (arrival at the gateway to the first "
            "body chunk relayed) by where the shadow residency had the adapter on the replica "
            "chosen, at the request's last routing decision (as "
            "loragate_routing_residency_total counts it): gpu, cpu, registered, unregistered "
            "(the gateway loaded it first: loragate_adapter_load_wait_seconds), or base (a "
            "request for the base model). A TTFT tail in gpu too is not adapter loads (a busy "
            "host, long queues: loragate_replica_requests).",
            ["residency"],
            ((k,) for k in self.ttft_residency),
            self.ttft_residency.values(),
        )
        yield _histogram_family(
            "loragate_ttft_by_adapter_seconds",
            "Streaming requests: loragate_ttft_seconds (arrival at the gateway to the first "
            "body chunk relayed) by adapter ('' = the base model). " + _ADAPTER_LABEL_DOC,
            ["adapter"],
            ((k,) for k in self.ttft_adapter),
            self.ttft_adapter.values(),
        )
        yield _histogram_family(
            "loragate_ttft_by_tenant_seconds",
            "Streaming requests: loragate_ttft_seconds by tenant. " + _TENANT_LABEL_DOC,
            ["tenant"],
            ((k,) for k in self.ttft_tenant),
            self.ttft_tenant.values(),
        )
        by_class = _by_status_class(self.duration)
        yield _histogram_family(
            "loragate_request_duration_seconds",
            "Requests of /v1/completions and /v1/chat/completions answered without a stream, "
            "as their client saw them: from arrival at the gateway to the whole answer handed "
            "to the connection (or to the client leaving), routing, adapter load waits and "
            "retries included (loragate_upstream_latency_seconds times each attempt alone). "
            "Every request but the SSE streams a replica began (their first chunk: "
            "loragate_ttft_seconds; their whole duration: loragate_stream_duration_seconds): "
            "non-streaming requests, and any request refused or failed before its stream "
            "began. By status_class (2xx, 4xx, 5xx: the HTTP status sent; "
            "client_closed: the client went away first) and residency (as "
            "loragate_ttft_by_residency_seconds, or none: ended before any replica was "
            "chosen, e.g. the gateway's own 400s and 401s).",
            ["status_class", "residency"],
            by_class.keys(),
            by_class.values(),
        )
        streams = _by_status_class(self.stream_duration)
        yield _histogram_family(
            "loragate_stream_duration_seconds",
            "Requests of /v1/completions and /v1/chat/completions a replica began an SSE "
            "stream for (those loragate_request_duration_seconds leaves out), as their client "
            "saw them: from arrival at the gateway to the stream's end handed to the "
            "connection (its [DONE], the replica's error event relayed, the client leaving, or "
            "the shutdown's cut), routing, adapter load waits and retries included. By "
            "status_class (2xx: the whole stream relayed; stream_error, client_closed, "
            "shutdown, or 5xx: cut at shutdown before anything was sent: as "
            "loragate_requests_total's status) and residency (as "
            "loragate_ttft_by_residency_seconds).",
            ["status_class", "residency"],
            streams.keys(),
            streams.values(),
        )
        yield _histogram_family(
            "loragate_request_duration_by_adapter_seconds",
            "Requests answered without a stream with a 2xx (as loragate_request_duration_"
            'seconds{status_class="2xx"}: arrival to the whole answer; a stream\'s first '
            "chunk is in loragate_ttft_by_adapter_seconds), by adapter ('' = the base model). "
            + _ADAPTER_LABEL_DOC,
            ["adapter"],
            ((k,) for k in self.duration_adapter),
            self.duration_adapter.values(),
        )
        yield _histogram_family(
            "loragate_request_duration_by_tenant_seconds",
            "loragate_request_duration_by_adapter_seconds by tenant. " + _TENANT_LABEL_DOC,
            ["tenant"],
            ((k,) for k in self.duration_tenant),
            self.duration_tenant.values(),
        )
        seen = self._replicas_seen
        seen.update(dict.fromkeys(self.replica_ids()))
        replica_ids = list(seen)
        residency = CounterMetricFamily(
            "loragate_routing_residency",
            "Routing decisions for an adapter (not the base model) by the replica chosen and "
            "where the shadow residency had the adapter there at that moment: gpu (in a GPU "
            "slot: no swap), cpu (in the CPU cache: moved to a GPU slot), registered (known "
            "to the replica but in neither cache, as far as the model knows: read from disk "
            "again), unregistered (not registered there: the gateway loads it first, "
            "loragate_adapter_load_wait_seconds). A request routed again (a retry) counts "
            "each decision. The share of gpu is the main measure of adapter-aware routing.",
            labels=["replica", "residency"],
        )
        _add_from_zero(residency, self.residency, replica_ids, RESIDENCIES)
        yield residency
        polls = CounterMetricFamily(
            "loragate_replica_poll_failures",
            "Polls of the replica (GET /health, /metrics, /v1/models, every poller.interval_s) "
            "that failed, by reason: connect (could not connect, or the connection dropped), "
            "timeout (no answer within poller.timeout_s), bad_response (an answer other than "
            "200, e.g. /health's 503 while vLLM stops, or one that could not be read), "
            "wrong_model (its /v1/models lacks the base model). poller.failures_to_unhealthy "
            "failures in a row take it out of rotation (loragate_replica_healthy), timeouts "
            "only once poller.timeouts_to_unhealthy polls in a row timed out; /admin/replicas "
            "last_error has the latest message, poll_timeouts_in_a_row the timeouts' count.",
            labels=["replica", "reason"],
        )
        _add_from_zero(polls, self.poll_failures, replica_ids, POLL_FAILURE_REASONS)
        yield polls
        yield _histogram_family(
            "loragate_adapter_load_duration_seconds",
            "Adapter loads this gateway instance made (POST /v1/load_lora_adapter, one per "
            "(adapter, replica) at a time however many requests wait; on-demand and admin-API "
            "loads), from the call to its end, by replica and result: ok (loaded: the loads "
            "loragate_adapter_loads_total counts), already_loaded (the replica had registered "
            "it meanwhile), refused (the replica refused it: "
            "loragate_adapter_load_refusals_total), timeout (no answer within "
            "limits.admin_timeout_s), unreachable (could not connect, or the connection "
            "dropped), stopping (the replica answered that it is shutting down: vLLM's 500 "
            "'Server shutting down' while it drains), abandoned (the replica stopped listening, "
            "or the gateway stopped), "
            "error (any other failure).",
            ["replica", "result"],
            self.load_duration.keys(),
            self.load_duration.values(),
        )
        yield _histogram_family(
            "loragate_adapter_load_wait_seconds",
            "Requests that waited for an adapter load on the replica routing chose (the "
            "adapter was not registered there), by replica: how long each waited, whatever "
            "the load's outcome (a request waits at most what is left of its "
            "limits.request_timeout_s; several requests can wait for one load). Part of "
            "their TTFT and latency as the client sees them.",
            ["replica"],
            ((k,) for k in self.load_wait),
            self.load_wait.values(),
        )


def routing_sha256(routing: RoutingConfig) -> str:
    """The sha256 of a routing section's canonical form (:mod:`loragate.routing.resolved`):
    equal for equivalent sections however they are written."""
    return _section_sha256(routing.build_spec(), routing.seed)


def instances_reading(
    readers_before: Callable[[float], Mapping[str, float]], window_s: float, now_s: float
) -> int:
    """This gateway instance and the others whose last read of the shared state
    (``readers_before``: the store's, epoch seconds) is at most ``window_s`` before
    ``now_s``."""
    return 1 + len(readers_before(math.inf)) - len(readers_before(now_s - window_s))


def status_class(status: str) -> str:
    """The ``status_class`` label of ``status`` (an HTTP status, or an outcome such as
    ``client_closed``): ``2xx``, ``4xx``, ... or the outcome itself."""
    if len(status) == 3 and status.isdigit():
        return status[0] + "xx"
    return status


def retry_reason(exc: UpstreamError, *, loading: bool) -> str:
    """The ``reason`` label of ``loragate_upstream_retries_total`` for a failure before any
    answer: what the replica did (see the metric's HELP)."""
    if isinstance(exc, AdapterLoadError):
        return "refused_load"
    if loading:
        return "load_failed"
    if isinstance(exc, UpstreamConnectError):
        cause = exc.__cause__
        # (aiohttp's ClientOSError is also an OSError: a reset mid-request, not a connect.)
        if isinstance(cause, TimeoutError | aiohttp.ClientConnectorError) or (
            isinstance(cause, OSError) and not isinstance(cause, aiohttp.ClientOSError)
        ):
            return "connect"
        return "dropped"
    return "bad_response"


def _histogram_family(
    name: str,
    doc: str,
    labels: list[str],
    label_values: Iterable[tuple[str, ...]],
    series: Iterable[_Histogram],
) -> Metric:
    """A histogram family: one series per label set of ``label_values``, whose counts are
    the ``_Histogram`` at the same place in ``series``."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    bounds = [repr(b) for b in _LATENCY_BUCKETS_S] + ["+Inf"]  # "0.005", "1.0": Prometheus' own
    for values, hist in zip(label_values, series, strict=True):
        cumulative = list(itertools.accumulate(hist.counts))
        family.add_metric(
            list(values), list(zip(bounds, cumulative, strict=True)), sum_value=hist.total
        )
    return family


def _by_status_class(
    series: Mapping[tuple[str, str], _Histogram],
) -> dict[tuple[str, str], _Histogram]:
    """``series`` by (status or outcome, residency) merged into (status class, residency)."""
    by_class: dict[tuple[str, str], _Histogram] = {}
    for (status, where), hist in series.items():
        key = (status_class(status), where)
        merged = by_class.get(key)
        if merged is None:
            merged = by_class[key] = _Histogram(len(_LATENCY_BUCKETS_S))
        merged.counts = [a + b for a, b in zip(merged.counts, hist.counts, strict=True)]
        merged.total += hist.total
    return by_class


def _add_from_zero(
    family: CounterMetricFamily,
    counts: Mapping[tuple[str, str], int],
    replica_ids: Iterable[str],
    values: Iterable[str],
) -> None:
    """``counts`` by (replica, label) into ``family``: every (replica, value) pair of
    ``replica_ids`` x ``values`` in that order, from 0 (increase() sees the first of each),
    then any other pair counted."""
    values = tuple(values)
    shown = set()
    for rid in replica_ids:
        for value in values:
            key = (rid, value)
            shown.add(key)
            family.add_metric([rid, value], counts.get(key, 0))
    for key, n in counts.items():
        if key not in shown:
            family.add_metric(list(key), n)


def _observe(series: dict[_K, _Histogram], key: _K, seconds: float) -> None:
    hist = series.get(key)
    if hist is None:
        hist = series[key] = _Histogram(len(_LATENCY_BUCKETS_S))
    hist.counts[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
    hist.total += seconds


class Telemetry:
    """Counters and histograms of the proxy.

    Per request this is a dict update and a ``bisect`` into the bucket bounds: the Prometheus
    client's own ``Counter``/``Histogram`` children take a lock and walk every bucket on each
    call, several times dearer, for values nobody reads between scrapes.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        adapter_labels: LabelFold | None = None,
        tenant_labels: LabelFold | None = None,
    ) -> None:
        """``adapter_labels``, ``tenant_labels``: the label values of adapters and tenants in
        every family (default: every name, ``all``)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.adapter_labels = adapter_labels if adapter_labels is not None else LabelFold()
        self.tenant_labels = tenant_labels if tenant_labels is not None else LabelFold()
        # Per request: ``values[name] if name in values else label(name)`` (no call on a hit).
        self._adapters, self._adapter_label = self.adapter_labels.values, self.adapter_labels.label
        self._tenants, self._tenant_label = self.tenant_labels.values, self.tenant_labels.label
        self._metrics = _ProxyMetrics()
        self.registry.register(self._metrics)
        self.registry.register(_BuildInfo())
        self.registry.register(
            _LabelNames({"adapter": self.adapter_labels, "tenant": self.tenant_labels})
        )
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # (A registry given in may hold them already: prometheus_client's default does.)
            with contextlib.suppress(ValueError):
                self.registry.register(collector)
        self._requests = self._metrics.requests
        self._latency = self._metrics.latency
        self._ttft = self._metrics.ttft
        self._ttft_residency = self._metrics.ttft_residency
        self._duration = self._metrics.duration
        self._residency = self._metrics.residency

    def bind_state(
        self,
        *,
        in_flight: Callable[[], Mapping[str, int]],
        healthy: Callable[[], Mapping[str, bool]],
        adapter_loads: Callable[[], Mapping[str, int]],
        shared_in_flight: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Read at scrape time, by replica: this instance's in-flight requests, health and
        adapter loads, and (``shared_in_flight``) the in-flight requests of every instance as
        the shared state has them."""
        self.registry.register(
            _ScrapeTimeGauges(in_flight, healthy, adapter_loads, shared_in_flight)
        )

    def bind_replicas(
        self,
        *,
        replica_ids: Callable[[], Iterable[ReplicaId]],
        snapshots: Callable[[], Iterable[ReplicaSnapshot]],
        residency_of: Callable[[ReplicaId], Residency],
        instances: Callable[[], int | None] | None = None,
    ) -> None:
        """What routing sees of each replica, read at scrape time: the pool's replicas now
        (``replica_ids``: their residency and poll-failure counters are shown from 0), their
        last snapshots (queue depth, KV usage, capacities), the shadow residency
        (``residency_of``) and (``instances``) how many gateway instances share the state
        store (None: not known now)."""
        self._metrics.replica_ids = replica_ids
        self.registry.register(_ReplicaView(snapshots, residency_of, instances))

    def bind_draining(self, draining: Callable[[], Mapping[str, bool]]) -> None:
        """Whether each replica is being drained (read at scrape time)."""
        self.registry.register(_DrainingGauge(draining))

    def bind_lora_off(self, causes: Callable[[], Mapping[str, str | None]]) -> None:
        """By replica: why it serves no adapters (one of ``backends.lora_off.CAUSES``), or
        None (read at scrape time)."""
        self.registry.register(_LoraOffGauge(causes))

    def bind_refusals(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Refused adapter loads by (adapter, replica), counted since start."""
        self.registry.register(_RefusalCounter(counts, self._adapter_label))

    def bind_shared_state(
        self,
        *,
        degraded: Callable[[], bool],
        errors: Callable[[], int],
        resync_counts: Callable[[], Mapping[str, int]] = dict,
        definition_conflicts: Callable[[], int] = lambda: 0,
    ) -> None:
        """The shared state store's health, and (``definition_conflicts``) the number of this
        instance's config-file adapters served with a definition other than its file's."""
        self.registry.register(_StateGauges(degraded, errors, resync_counts, definition_conflicts))

    def count(
        self,
        adapter: str,
        replica: str,
        status: str,
        residency: ResidencyLabel = NOT_ROUTED,
        seconds: float | None = None,
        tenant: str = "",
    ) -> None:
        """A request of the completions endpoints ended with ``status`` (an HTTP status or an
        outcome), answered without a stream (see :meth:`count_stream`). ``seconds``: from its
        arrival to its whole answer (None: not observed), with the ``residency`` of its last
        routing decision (one of ``ROUTED_RESIDENCIES``, or ``NOT_ROUTED``); a 2xx's also by
        ``adapter`` and ``tenant`` ('': none)."""
        labels = self._adapters
        adapter = labels[adapter] if adapter in labels else self._adapter_label(adapter)
        key = (adapter, replica, status)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        if seconds is not None:
            bucket = bisect_left(_LATENCY_BUCKETS_S, seconds)
            try:
                hist = self._duration[status, residency]
            except KeyError:
                hist = self._duration[status, residency] = _new()
            hist.counts[bucket] += 1
            hist.total += seconds
            if status[0] == "2":  # (an outcome label never starts with a digit)
                hist = self._metrics.duration_adapter[adapter]
                hist.counts[bucket] += 1
                hist.total += seconds
                labels = self._tenants
                tenant = labels[tenant] if tenant in labels else self._tenant_label(tenant)
                hist = self._metrics.duration_tenant[tenant]
                hist.counts[bucket] += 1
                hist.total += seconds

    def count_stream(
        self, adapter: str, replica: str, status: str, residency: ResidencyLabel, seconds: float
    ) -> None:
        """A request a replica began an SSE stream for ended with ``status`` (an HTTP status
        or an outcome), ``seconds`` after its arrival (loragate_stream_duration_seconds)."""
        labels = self._adapters
        adapter = labels[adapter] if adapter in labels else self._adapter_label(adapter)
        key = (adapter, replica, status)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        hist = self._metrics.stream_duration[status, residency]
        hist.counts[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
        hist.total += seconds

    def count_tokenizer(self, endpoint: str, replica: str, status: str) -> None:
        """A request of ``gateway.tokenize``'s ``endpoint`` answered ``status``."""
        key = (endpoint, replica, status)
        counts = self._metrics.tokenizer
        counts[key] = counts.get(key, 0) + 1

    def count_http_error(self, status: int) -> None:
        """One request the HTTP layer answered itself (see ``gateway/protocol_errors.py``)."""
        key = str(status)
        errors = self._metrics.http_errors
        errors[key] = errors.get(key, 0) + 1

    def count_header_timeout(self) -> None:
        """A client connection closed at its request-head deadline (``gateway.head_deadline``)."""
        self._metrics.header_timeouts += 1

    def count_endpoint_error(self, endpoint: str, status: int) -> None:
        """An error answer of the gateway's own endpoint class ``endpoint`` (one of
        ``ENDPOINT_CLASSES``)."""
        key = (endpoint, str(status))
        errors = self._metrics.endpoint_errors
        errors[key] = errors.get(key, 0) + 1

    def count_retry(self, replica: str, reason: str) -> None:
        """A request sent again because ``replica`` failed it (see :func:`retry_reason`)."""
        key = (replica, reason)
        retries = self._metrics.retries
        retries[key] = retries.get(key, 0) + 1

    def count_reload(self, result: str) -> None:
        """A config reload: ``ok``, ``rejected`` (nothing changed) or ``error``."""
        reloads = self._metrics.reloads
        reloads[result] = reloads.get(result, 0) + 1

    def set_config(self, policy: str, routing: RoutingConfig) -> None:
        """The policy in force and its routing section (``loragate_config_info``)."""
        self._metrics.config = (policy, routing_sha256(routing))

    def count_residency(self, replica: str, adapter: str, residency: Residency) -> AdapterResidency:
        """A routing decision sent a request for ``adapter`` to ``replica``, whose shadow
        residency was ``residency`` (before the request touched it); returns where the
        adapter was (one of ``RESIDENCIES``)."""
        where: AdapterResidency
        if adapter in residency.gpu:
            where = "gpu"
        elif adapter in residency.cpu:
            where = "cpu"
        elif adapter in residency.registered:
            where = "registered"
        else:
            where = "unregistered"
        key = (replica, where)
        counts = self._residency
        counts[key] = counts.get(key, 0) + 1
        return where

    def count_poll_failure(self, replica: str, reason: str) -> None:
        """A poll of ``replica`` failed (``reason``: one of the pool's
        ``POLL_FAILURE_REASONS``)."""
        key = (replica, reason)
        failures = self._metrics.poll_failures
        failures[key] = failures.get(key, 0) + 1

    def observe_adapter_load(self, replica: str, result: str, seconds: float) -> None:
        """An adapter load on ``replica`` ended with ``result`` (the pool's
        ``on_load_done``) after ``seconds``."""
        _observe(self._metrics.load_duration, (replica, result), seconds)

    def observe_load_wait(self, replica: str, seconds: float) -> None:
        """A request waited ``seconds`` for an adapter load on ``replica``."""
        _observe(self._metrics.load_wait, replica, seconds)

    def observe_latency(self, replica: str, seconds: float) -> None:
        hist = self._latency.get(replica)
        if hist is None:
            hist = self._latency[replica] = _Histogram(len(_LATENCY_BUCKETS_S))
        hist.counts[bisect_left(_LATENCY_BUCKETS_S, seconds)] += 1
        hist.total += seconds

    def observe_ttft(
        self,
        replica: str,
        seconds: float,
        residency: RoutedResidency = BASE,
        adapter: str = "",
        tenant: str = "",
    ) -> None:
        """A stream's first chunk went out ``seconds`` after its request arrived; its last
        routing decision found the adapter (``adapter``; '': the base model) at ``residency``
        (one of ``ROUTED_RESIDENCIES``); ``tenant``: its API key's ('': none)."""
        hist = self._ttft.get(replica)
        if hist is None:
            hist = self._ttft[replica] = _Histogram(len(_LATENCY_BUCKETS_S))
        bucket = bisect_left(_LATENCY_BUCKETS_S, seconds)  # (one bound search for all)
        hist.counts[bucket] += 1
        hist.total += seconds
        hist = self._ttft_residency[residency]
        hist.counts[bucket] += 1
        hist.total += seconds
        labels = self._adapters
        hist = self._metrics.ttft_adapter[
            labels[adapter] if adapter in labels else self._adapter_label(adapter)
        ]
        hist.counts[bucket] += 1
        hist.total += seconds
        labels = self._tenants
        hist = self._metrics.ttft_tenant[
            labels[tenant] if tenant in labels else self._tenant_label(tenant)
        ]
        hist.counts[bucket] += 1
        hist.total += seconds

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
