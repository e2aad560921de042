"""The composition root: :func:`create_app` wires config, replica pool, routing policy,
in-flight tracker, telemetry and handlers into one ``aiohttp`` application.

Lifecycle (cleanup context): one ``ClientSession`` (polling and admin calls) is made at
startup, the pool polls every replica once and then keeps polling in the background; at
cleanup the poller stops, the replicas' keep-alive connections close and the session closes.
Proxied requests go through each replica's lean keep-alive pool (``backends.upstream``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from loragate.backends.pool import ReplicaPool
from loragate.core.clock import Clock, WallClock
from loragate.core.config import GatewayConfig
from loragate.core.errors import LoragateError
from loragate.gateway.catalog import Catalog
from loragate.gateway.errors import error_response
from loragate.gateway.inflight import InFlightTracker, LocalInFlight
from loragate.gateway.proxy import Proxy
from loragate.gateway.telemetry import CONTENT_TYPE, Telemetry
from loragate.routing import Policy, build_policy


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
    session: aiohttp.ClientSession | None = None

    @property
    def catalog(self) -> Catalog:
        return self.proxy.catalog


GATEWAY = web.AppKey("loragate.gateway", Gateway)


def catalog_from_config(config: GatewayConfig) -> Catalog:
    return Catalog(
        base_model=config.base_model,
        adapters=config.adapters,
        api_keys=config.tenant_by_key(),
    )


def create_app(
    config: GatewayConfig,
    *,
    pool: ReplicaPool | None = None,
    clock: Clock | None = None,
    policy: Policy | None = None,
    inflight: InFlightTracker | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Build the gateway app. Every collaborator can be passed in; the defaults come from
    ``config``. The app starts and stops ``pool`` (binding it to the app's session)."""
    clock = clock or WallClock()
    if pool is None:
        pool = ReplicaPool(
            config.replicas,
            poller=config.poller,
            admin_timeout_s=config.limits.admin_timeout_s,
            connect_timeout_s=config.limits.connect_timeout_s,
            max_idle_connections=config.limits.max_upstream_connections,
            clock=clock,
        )
    if policy is None:
        policy = build_policy(config.routing.build_spec(), seed=config.routing.seed)
    if inflight is None:
        inflight = LocalInFlight(pool.replica_ids)
    telemetry = Telemetry(registry)
    tracker = inflight
    telemetry.bind_state(
        in_flight=lambda: {rid: tracker.count(rid) for rid in pool.replica_ids},
        healthy=lambda: {rid: pool.is_healthy(rid) for rid in pool.replica_ids},
        adapter_loads=pool.adapter_loads,
    )
    proxy = Proxy(
        catalog=catalog_from_config(config),
        pool=pool,
        policy=policy,
        inflight=inflight,
        telemetry=telemetry,
        limits=config.limits,
        clock=clock,
    )
    gateway = Gateway(
        config=config,
        pool=pool,
        policy=policy,
        inflight=inflight,
        telemetry=telemetry,
        proxy=proxy,
        clock=clock,
    )
    # aiohttp enforces the body limit while reading chunked bodies; the proxy maps it to 413.
    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
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
    try:
        await gateway.pool.start(session)
        yield
    finally:
        await gateway.pool.stop()
        await session.close()
        gateway.session = None


# -- small handlers -------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the base model and every adapter the caller's tenant may use."""
    catalog = request.app[GATEWAY].catalog
    try:
        tenant = catalog.tenant_of(request.headers.get(hdrs.AUTHORIZATION))
    except LoragateError as exc:
        return error_response(exc)
    return web.Response(body=catalog.models_json(tenant), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 ``ok`` (all replicas healthy) or ``degraded`` (some), 503 if none."""
    pool = request.app[GATEWAY].pool
    total = len(pool.replica_ids)
    healthy = len(pool.healthy_snapshots())
    status = "ok" if healthy == total else ("degraded" if healthy else "unavailable")
    body = {"status": status, "replicas_healthy": healthy, "replicas_total": total}
    return web.Response(
        status=200 if healthy else 503,
        body=json.dumps(body).encode(),
        content_type="application/json",
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].telemetry.render()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})
