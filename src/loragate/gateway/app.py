"""The composition root: :func:`create_app` wires config, replica pool, routing policy,
shared state (store), in-flight tracker, telemetry, the admin API and handlers into one
``aiohttp`` application.

Lifecycle (cleanup context): one ``ClientSession`` (polling and admin calls) is made at
startup; the state store connects (a ``ResilientStore`` starts degraded if Redis is down, it
never fails the start) and gets the configured replicas; the pool polls every replica once and
then keeps polling in the background (each poll reconciles the shared shadow residency); a
background task maintains the store (lease renewal, refresh, reconnects) and picks up adapter
registry changes made by other instances; another measures how late the event loop runs
(``gateway.loop_lag``). At cleanup those tasks and the poller stop, pending lease releases
drain, the store and the replicas' keep-alive connections close, then the session. Proxied
requests go through each replica's lean keep-alive pool (``backends.upstream``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from loragate.backends.pool import ReplicaPool
from loragate.core.clock import Clock, WallClock
from loragate.core.config import METRICS_TOKEN_ENV, GatewayConfig
from loragate.core.errors import AuthenticationError, LoragateError
from loragate.core.tasks import cancel_and_wait
from loragate.core.types import AdapterId, AdapterSpec, ReplicaId
from loragate.gateway.adapter_rank import RankLimits
from loragate.gateway.admin import AdminApi, bearer_matches
from loragate.gateway.admin_name_locks import NameLocks
from loragate.gateway.admin_replicas import drain_path_only
from loragate.gateway.catalog import Catalog
from loragate.gateway.config_warnings import warn_ignored_file_tokens, warn_same_servers
from loragate.gateway.endpoint_errors import EndpointErrors
from loragate.gateway.errors import error_payload, error_response
from loragate.gateway.expect_continue import Handler, expect_handler
from loragate.gateway.inflight import InFlightTracker, LocalInFlight
from loragate.gateway.label_fold import LabelFold
from loragate.gateway.loop_lag import LoopLag
from loragate.gateway.proxy import Proxy
from loragate.gateway.request_body import encoding_refused
from loragate.gateway.request_ids import RequestIds, with_request_id
from loragate.gateway.route_errors import NoReplicaLog, method_not_allowed, not_found
from loragate.gateway.shared import SharedState, build_store
from loragate.gateway.telemetry import CONTENT_TYPE, Telemetry, instances_reading
from loragate.gateway.tokenize import TokenizerProxy
from loragate.gateway.unknown_adapters import UnknownAdapterWarning
from loragate.routing import Policy, build_policy
from loragate.state import GatewayStore

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class Gateway:
    """Everything one gateway app is made of (``app[GATEWAY]``)."""

    config: GatewayConfig
    pool: ReplicaPool
    policy: Policy
    inflight: InFlightTracker
    telemetry: Telemetry
    proxy: Proxy
    clock: Clock
    shared: SharedState
    endpoint_errors: EndpointErrors
    # How late the event loop runs (its task: the app's lifecycle; its series: the registry's).
    loop_lag: LoopLag
    # The app's one request-id generator (``gateway.request_ids``): the proxy's, the other
    # endpoints', aiohttp's own error answers' and the pool's own admin calls'.
    request_ids: RequestIds = field(default_factory=RequestIds)
    config_path: Path | None = None
    session: aiohttp.ClientSession | None = None
    # Serialises reloads and admin writes that rebuild the catalog.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One config reload at a time, from its file read to its apply (``reload.reload_from_file``).
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One admin write of an adapter name at a time on this instance (``admin_name_locks``).
    admin_names: NameLocks = field(default_factory=NameLocks)
    # The admin writes under way (``admin_common.run_to_the_end``), held till they end; the
    # shutdown waits for them within the drain period (``runner``).
    admin_writes: set[asyncio.Task[Any]] = field(default_factory=set)
    # Set when the shutdown begins (the runner): GET /readyz answers 503 from then on.
    shutting_down: bool = False

    @property
    def catalog(self) -> Catalog:
        return self.proxy.catalog

    @property
    def admin_token(self) -> str | None:
        """The ``LORAGATE_ADMIN_TOKEN`` environment variable if set, else ``admin.token`` (read
        and checked with the config file: ``core.config``)."""
        return self.config.admin.token

    def rebuild_catalog(self, shared: Mapping[AdapterId, AdapterSpec] | None = None) -> None:
        """Config adapters (as defined for every instance: ``SharedState.config_adapters``)
        plus those registered through the admin API (shared store)."""
        self.shared.set_config_adapters(self.config.adapters)  # a reload may change them
        adapters = self.shared.shared_adapters() if shared is None else shared
        catalog = self.proxy.catalog = catalog_from_config(
            self.config, adapters, self.shared.config_adapters()
        )
        self.pool.expect_adapters(catalog.adapters)  # the paths replicas must hold them from


GATEWAY = web.AppKey("loragate.gateway", Gateway)


def catalog_from_config(
    config: GatewayConfig,
    shared: Mapping[AdapterId, AdapterSpec] | None = None,
    config_adapters: Sequence[AdapterSpec] | None = None,
) -> Catalog:
    """The config file's adapters (``config_adapters``: as in force for every instance, see
    ``SharedState.config_adapters``; default: as the file says), plus ``shared`` ones (admin
    API) it does not define."""
    adapters = list(config.adapters if config_adapters is None else config_adapters)
    if shared:
        own = {a.name for a in adapters}
        adapters += [shared[n] for n in sorted(shared) if n not in own]
    return Catalog(
        base_model=config.base_model,
        adapters=adapters,
        api_keys=config.tenant_by_key(),
        rank_limits=RankLimits.of(config.replicas),
    )


def create_app(
    config: GatewayConfig,
    *,
    pool: ReplicaPool | None = None,
    clock: Clock | None = None,
    policy: Policy | None = None,
    inflight: InFlightTracker | None = None,
    registry: CollectorRegistry | None = None,
    store: GatewayStore | None = None,
    config_path: str | Path | None = None,
) -> web.Application:
    """Build the gateway app. Every collaborator can be passed in; the defaults come from
    ``config`` (``store``: from its ``state:`` section). The app starts and stops ``pool``
    (binding it to the app's session) and ``store``. ``config_path`` is the file that
    ``POST /admin/reload`` and SIGHUP re-read."""
    clock = clock or WallClock()
    if pool is None:
        pool = ReplicaPool(
            config.replicas,
            poller=config.poller,
            admin_timeout_s=config.limits.admin_timeout_s,
            connect_timeout_s=config.limits.connect_timeout_s,
            max_idle_connections=config.limits.max_upstream_connections,
            clock=clock,
            base_model=config.base_model,
        )
    if policy is None:
        policy = build_policy(config.routing.build_spec(), seed=config.routing.seed)
    if inflight is None:
        inflight = LocalInFlight(pool.replica_ids)
    backend = config.state.backend if store is None else type(store).__name__
    shared = SharedState(
        store if store is not None else build_store(config.state),
        inflight,
        backend=backend,
        maintenance_interval_s=config.state.maintenance_interval_s,
        clock=clock,
    )
    pool.listener = shared
    shared.on_drains = pool.set_draining
    shared.on_stopping = pool.adopt_stopping
    shared.on_unloads = pool.forget_unloaded
    shared.set_config_adapters(config.adapters)  # claimed by shared.start()
    labels = config.metrics  # (read at start only: a reload keeps them)
    telemetry = Telemetry(
        registry,
        # first_n keeps the file's names first, in file order: the same on every instance;
        # listed keeps the names listed.
        adapter_labels=LabelFold(
            labels.adapter_labels,
            labels.adapter_label_limit,
            seeds=labels.adapter_label_names or [a.name for a in config.adapters],
        ),
        tenant_labels=LabelFold(
            labels.tenant_labels,
            labels.tenant_label_limit,
            seeds=labels.tenant_label_names or [t.name for t in config.tenants],
        ),
    )
    tracker = inflight

    def in_flight_replicas() -> list[ReplicaId]:
        """The pool's replicas (config order), then those a reload removed that requests of
        this instance still run on (until the last of them ends)."""
        ids = pool.replica_ids
        return [*ids, *(rid for rid, n in tracker.counts().items() if n and rid not in ids)]

    telemetry.bind_state(
        in_flight=lambda: {rid: tracker.count(rid) for rid in in_flight_replicas()},
        healthy=lambda: {rid: pool.is_healthy(rid) for rid in pool.replica_ids},
        adapter_loads=pool.adapter_loads,
        shared_in_flight=lambda: {rid: shared.in_flight_of(rid) for rid in in_flight_replicas()},
    )
    telemetry.set_config(policy.name, config.routing)
    pool.on_load_done = telemetry.observe_adapter_load
    pool.on_poll_failed = telemetry.count_poll_failure
    readers_window_s = max(3.0 * config.state.refresh_s, 5.0)
    telemetry.bind_replicas(
        replica_ids=lambda: pool.replica_ids,
        snapshots=pool.snapshots,
        residency_of=shared.residency_of,
        instances=lambda: (
            None
            if shared.degraded
            else instances_reading(shared.store.readers_before, readers_window_s, time.time())
        ),
    )
    telemetry.bind_draining(lambda: {rid: pool.is_draining(rid) for rid in pool.replica_ids})
    telemetry.bind_refusals(lambda: pool.refusals.counts)
    telemetry.bind_lora_off(
        lambda: {
            rid: off.cause if (off := pool.lora_off.get(rid)) is not None else None
            for rid in pool.replica_ids
        }
    )
    telemetry.bind_shared_state(
        degraded=lambda: shared.degraded,
        errors=lambda: shared.error_count,
        resync_counts=shared.resync_counts,
        definition_conflicts=lambda: len(shared.definition_conflicts()),
    )
    catalog = catalog_from_config(config)
    pool.expect_adapters(catalog.adapters)
    endpoint_errors = EndpointErrors(telemetry, clock)
    no_replica = NoReplicaLog(pool, clock)
    ids = RequestIds()
    pool.new_request_id = ids.new  # (the ids of the pool's own loads and unloads)
    proxy = Proxy(
        catalog=catalog,
        pool=pool,
        policy=policy,
        inflight=inflight,
        state=shared,
        telemetry=telemetry,
        limits=config.limits,
        clock=clock,
        auth_failed=endpoint_errors.auth_failed,  # logged as the own endpoints' 401s are
        no_replica=no_replica.refused,
        ids=ids,
    )
    gateway = Gateway(
        config=config,
        pool=pool,
        policy=policy,
        inflight=inflight,
        telemetry=telemetry,
        proxy=proxy,
        clock=clock,
        shared=shared,
        endpoint_errors=endpoint_errors,
        loop_lag=LoopLag(
            lambda: gateway.config.metrics.loop_lag_interval_s,  # (a reload replaces the config)
            lambda: gateway.config.metrics.loop_lag_warning_s,
            clock,
        ),
        request_ids=ids,
        config_path=None if config_path is None else Path(config_path),
    )
    shared.on_adapters = gateway.rebuild_catalog
    telemetry.registry.register(gateway.loop_lag)
    # The body limit is enforced by request_body.read_request_body (also after a reload changed
    # it); client_max_size only bounds handlers that would read with request.read().
    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle)

    # The completion endpoints make their request ids themselves (the hot path), and so do the
    # forwarded tokenizer endpoints (``gateway.tokenize``, the proxy's generator); every other
    # handler is wrapped (``request_ids.with_request_id``): no middleware, no response hook.
    def refused_unread(request: web.Request) -> bool:
        """Whether the proxy's and the tokenizer's handlers refuse ``request`` before reading
        its body (``gateway.expect_continue``): no or a wrong API key, a Content-Length
        over the limit (as the config in force says), or a Content-Encoding it does not read
        (415)."""
        length = request.content_length
        if length is not None and length > gateway.config.limits.max_body_bytes:
            return True
        if encoding_refused(request):
            return True
        try:
            gateway.catalog.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
        except LoragateError:
            return True
        return False

    def add_post(path: str, handler: Handler) -> None:
        app.router.add_post(
            path, handler, expect_handler=expect_handler(handler, refused_unread, ids)
        )

    add_post("/v1/completions", proxy.completions)
    add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_get("/v1/models", with_request_id(ids, list_models))
    tokenizer = TokenizerProxy(
        proxy=proxy,
        pool=pool,
        state=shared,
        telemetry=telemetry,
        limits=lambda: gateway.config.limits,  # (a reload replaces the config)
        auth_failed=endpoint_errors.auth_failed,
        no_replica=no_replica.refused,
    )
    add_post("/tokenize", tokenizer.tokenize)
    add_post("/detokenize", tokenizer.detokenize)
    app.router.add_get("/version", tokenizer.version)
    app.router.add_get("/health", with_request_id(ids, health))
    # vLLM's /ping is its /health (VLLM_API.md 4.6): the same answer here.
    app.router.add_get("/ping", with_request_id(ids, health))
    app.router.add_get("/livez", with_request_id(ids, livez))
    app.router.add_get("/readyz", with_request_id(ids, readyz))
    app.router.add_get("/metrics", with_request_id(ids, metrics))
    AdminApi(gateway).register(app.router)
    # Last: only requests no route above takes (the router tries exact paths first, so the
    # hot path never reaches it). [\s\S]: any character, a newline (%0a) too ('.' is not).
    app.router.add_route("*", r"/{path:[\s\S]*}", with_request_id(ids, no_route))
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    warn_ignored_file_tokens(gateway.config, when="at start-up")
    # Polling and admin calls only; the proxy uses each replica's lean keep-alive pool.
    connector = aiohttp.TCPConnector(
        limit=64,
        limit_per_host=8,
        keepalive_timeout=30.0,
        enable_cleanup_closed=False,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # pass bodies through as they are
        cookie_jar=aiohttp.DummyCookieJar(),  # replicas set no cookies: skip the jar's work
        skip_auto_headers=(hdrs.USER_AGENT,),
    )
    gateway.session = session
    shared = gateway.shared
    maintenance: asyncio.Task[None] | None = None
    same: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    lag: asyncio.Task[None] | None = None
    try:
        await shared.start()
        await shared.register_replicas(gateway.config.replicas)
        shared.check_adapters()  # adapters other instances registered before we started
        shared.sync_drains()  # drains kept in Redis: none of them gets a request from us
        shared.sync_stopping()  # replicas another instance found shutting down: held from
        # the first poll on (the pool's first poll finds them held)
        await gateway.pool.start(session)
        unknown = UnknownAdapterWarning(gateway)
        unknown.check()  # adapters the replicas hold that the catalog lacks: said once
        watch = asyncio.create_task(
            unknown.watch(gateway.config.poller.interval_s), name="loragate-unknown-adapters"
        )
        maintenance = asyncio.create_task(shared.run(), name="loragate-state-maintenance")
        same = asyncio.create_task(
            warn_same_servers(gateway.config.replicas), name="loragate-same-servers"
        )
        lag = asyncio.create_task(gateway.loop_lag.run(), name="loragate-loop-lag")
        yield
    finally:
        if lag is not None:
            await cancel_and_wait(lag)
        if same is not None:
            await cancel_and_wait(same)
        if watch is not None:
            await cancel_and_wait(watch)
        if maintenance is not None:
            await cancel_and_wait(maintenance)
        await gateway.pool.stop()
        await shared.close()
        await session.close()
        gateway.session = None


# -- small handlers -------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the base model and every adapter the caller's tenant may use, in
    vLLM 0.32's card shape (the base model's ``root`` and ``max_model_len`` from the poller)."""
    gateway = request.app[GATEWAY]
    catalog = gateway.catalog
    try:
        tenant = catalog.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
    except LoragateError as exc:
        return gateway.endpoint_errors.answered(request, error_response(exc))
    body = catalog.models_json(tenant, gateway.pool.base_model_card())
    return web.Response(body=body, content_type="application/json")


def _healthy_replicas(gateway: Gateway) -> tuple[int, int]:
    """(healthy replicas, replicas): ``/health``'s and ``/readyz``'s verdict (drained replicas
    count as healthy if they are: an operator's doing, not a fault)."""
    pool = gateway.pool
    ids = pool.replica_ids
    return sum(1 for rid in ids if pool.is_healthy(rid)), len(ids)


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 ``ok`` (all replicas healthy, shared state reachable) or
    ``degraded`` (some replicas, or Redis unreachable: routing on the local view), 503 if no
    replica is healthy. Drained replicas count as healthy if they are (an operator's doing,
    not a fault); ``replicas_draining`` counts them."""
    gateway = request.app[GATEWAY]
    pool = gateway.pool
    ids = pool.replica_ids
    healthy, total = _healthy_replicas(gateway)
    state = gateway.shared.status()
    ok = healthy == total and not state["degraded"]
    status = "ok" if ok else ("degraded" if healthy else "unavailable")
    body = {
        "status": status,
        "replicas_healthy": healthy,
        "replicas_total": total,
        "replicas_draining": sum(1 for rid in ids if pool.is_draining(rid)),
        "state": state,
    }
    return web.Response(
        status=200 if healthy else 503,
        body=json.dumps(body).encode(),
        content_type="application/json",
    )


_PROBE_OK = json.dumps({"status": "ok"}).encode()


async def livez(_: web.Request) -> web.Response:
    """``GET /livez`` (a liveness probe): 200 while the process serves HTTP. It checks nothing
    else: a gateway whose replicas are down or starting (vLLM takes minutes) is alive, and
    restarting it would not help. Open (no token)."""
    return web.Response(body=_PROBE_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz`` (a readiness probe): 200 while the gateway takes requests, 503 in the
    OpenAI error shape, code ``shutting_down``, from the moment a shutdown begins (during
    ``server.shutdown_delay_s`` it still serves, so that Kubernetes takes the pod out of its
    Service's endpoints before it stops accepting). Replica health does not make it 503: every
    gateway sees the same replicas, so all of them would leave the Service at once while vLLM
    starts or is down (clients refused a connection instead of answered a 503 that says why,
    and a rolling update of the gateways blocked until vLLM is back). The body says how many
    replicas are healthy (``/health`` has the details). Open (no token)."""
    gateway = request.app[GATEWAY]
    if gateway.shutting_down:
        body = error_payload("the gateway is shutting down", "service_unavailable", "shutting_down")
        return web.Response(status=503, body=body, content_type="application/json")
    healthy, total = _healthy_replicas(gateway)
    ready = json.dumps({"status": "ok", "replicas_healthy": healthy, "replicas": total})
    return web.Response(text=ready, content_type="application/json")


async def no_route(request: web.Request) -> web.Response:
    """An unknown path (404) or a method a path does not take (405, with ``Allow``), in the
    OpenAI error shape rather than aiohttp's plain-text pages."""
    own = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not own:
            allowed |= (await resource.resolve(request))[1]
    allowed.discard(hdrs.METH_ANY)  # a fallback for any method (this one, /admin's)
    if hdrs.METH_GET in allowed and drain_path_only(request.app[GATEWAY], request.path):
        # GET /admin/replicas/{id:.+} matches a drain path but answers it 405: not allowed.
        allowed -= {hdrs.METH_GET, hdrs.METH_HEAD}
    response = method_not_allowed(request, allowed) if allowed else not_found(request)
    return request.app[GATEWAY].endpoint_errors.answered(request, response)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: open unless a metrics token is set (``LORAGATE_METRICS_TOKEN``, else
    ``metrics.token``): then a 401 in the OpenAI error shape without
    ``Authorization: Bearer <token>`` (the series name adapters, which tenants must not see)."""
    gateway = request.app[GATEWAY]
    token = gateway.config.metrics.token  # a reload may set or change it
    if token is not None and not bearer_matches(request, token):
        refused = error_response(  # with WWW-Authenticate: Bearer
            AuthenticationError(
                "/metrics: missing or invalid metrics token (Authorization: Bearer <token>; "
                f"the token is {METRICS_TOKEN_ENV} if set, else metrics.token)"
            )
        )
        return gateway.endpoint_errors.answered(request, refused)
    return web.Response(body=gateway.telemetry.render(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})
