"""Run a gateway app on a socket: in-process for tests and the demo, or until a signal for
``loragate serve``. The event loop (uvloop or not) is the caller's choice.

Start-up binds the listening socket before anything else: a port in use (or an address not on
this host) fails at once with :class:`ListenError`, before the app starts or polls a replica.

Shutdown (leaving :func:`running_gateway`; SIGTERM/SIGINT in ``loragate serve``), as a load
balancer drains: ``GET /readyz`` answers 503 from its start. In ``loragate serve`` the gateway
first keeps accepting and serving for ``server.shutdown_delay_s`` (default 0), the time
Kubernetes needs to take the pod out of its Service's endpoints after the SIGTERM
(:func:`shutdown_delay`). Then the listening socket closes at once (new connections are
refused) and idle keep-alive connections close; the requests in flight may finish within the
drain period (``server.shutdown_timeout_s``); those still running then are answered (a 503, or
a final SSE error event once a stream started) and their upstream connections closed (vLLM
aborts the generations). The whole shutdown is bounded by the delay, the drain period, about
3 s of grace (CUT_GRACE_S, then 2 x HANDLER_GRACE_S for handlers outside the proxy) and the
app cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from loragate.core.config import GatewayConfig
from loragate.core.errors import ConfigError
from loragate.gateway.app import GATEWAY, Gateway, create_app
from loragate.gateway.protocol_errors import OpenAIErrorAppRunner
from loragate.gateway.reload import log_reload_failure, reload_from_file

log = logging.getLogger(__name__)

# After the drain period: how long the answers of the requests cut then may take to go out.
CUT_GRACE_S = 1.0
# Then aiohttp's own shutdown, for handlers outside the proxy (admin, /health, /metrics; they
# had the drain period too): it waits this long, cancels them and waits this long again.
HANDLER_GRACE_S = 1.0
_BACKLOG = 128  # the listening sockets' (aiohttp's default)


class ListenError(Exception):
    """The gateway cannot bind its listening socket (address in use, not on this host, no
    permission); the message names the address."""


@dataclass(frozen=True, slots=True)
class RunningGateway:
    url: str  # e.g. "http://127.0.0.1:41234" (no trailing slash; the OpenAI base is url + "/v1")
    host: str
    port: int
    app: web.Application

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_timeout_s: float | None = None,
    **create_app_kwargs: Any,
) -> AsyncIterator[RunningGateway]:
    """Serve a gateway built by ``create_app(config, **create_app_kwargs)`` until the block
    exits, then shut down gracefully (see the module docstring); ``shutdown_timeout_s`` is the
    drain period (default: ``server.shutdown_timeout_s``). ``port=0`` picks a free port;
    ``host``/``port`` default to ``config.server``. Raises :class:`ListenError` if the socket
    cannot be bound."""
    host = config.server.host if host is None else host
    port = config.server.port if port is None else port
    # The socket first: a port in use fails the start before the app polls any replica.
    socks = await _listen(host, port)
    try:
        app = create_app(config, **create_app_kwargs)
    except BaseException:
        _close_all(socks)
        raise
    listening = False
    shutting_down = False

    async def close_after_answer(_: web.Request, response: web.StreamResponse) -> None:
        # aiohttp closes a connection after the answer it is busy with once the shutdown has
        # begun, but the answer itself still says keep-alive: a client would send its next
        # request on a connection that is about to close, and lose it. Say so in the answer.
        # (aiohttp has worked out the headers before this hook: set the header too.)
        if shutting_down:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    app.on_response_prepare.append(close_after_answer)

    async def drain(app: web.Application) -> None:
        # aiohttp's on_shutdown: the site is closed; aiohttp's own shutdown (HANDLER_GRACE_S)
        # follows. Nothing to drain, or to say, if the socket was never bound.
        nonlocal shutting_down
        shutting_down = True
        app[GATEWAY].shutting_down = True  # /readyz: 503 (on connections still open)
        if not listening:
            return
        if runner.server is not None:
            await _close_idle_connections(runner.server)
        gateway = app[GATEWAY]
        period = (
            gateway.config.server.shutdown_timeout_s
            if shutdown_timeout_s is None
            else shutdown_timeout_s
        )
        log.info(
            "shutdown: not accepting connections; %s in flight, waiting up to %g s for them",
            _requests(gateway.proxy.in_flight),
            period,
        )
        finished, cut = await gateway.proxy.drain(period, grace_s=CUT_GRACE_S)
        log.info(
            "shutdown: %s finished during the drain, %d cut at its end (answered with an error)",
            _requests(finished),
            cut,
        )

    app.on_shutdown.append(drain)
    # handler_cancellation: a client that goes away cancels its handler, which drops the
    # upstream connection, which makes vLLM abort the generation. OpenAIErrorAppRunner: a
    # request aiohttp's HTTP parser rejects gets an OpenAI-shaped JSON error, not plain text,
    # counted in /metrics (loragate_http_errors_total).
    runner = OpenAIErrorAppRunner(
        app,
        on_error=app[GATEWAY].telemetry.count_http_error,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=HANDLER_GRACE_S,
    )
    try:
        await runner.setup()
    except BaseException:
        _close_all(socks)
        raise
    try:
        try:
            for sock in socks:
                await web.SockSite(runner, sock, backlog=_BACKLOG).start()
        except BaseException:
            _close_all(socks)  # (those a site serves already are closed again: harmless)
            raise
        listening = True
        bound = runner.addresses[0]
        actual_host, actual_port = str(bound[0]), int(bound[1])
        url_host = f"[{actual_host}]" if ":" in actual_host else actual_host
        yield RunningGateway(
            url=f"http://{url_host}:{actual_port}", host=actual_host, port=actual_port, app=app
        )
    finally:
        await runner.cleanup()


async def _listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``, made as ``loop.create_server`` makes them
    (what ``web.TCPSite`` calls): one per address ``host`` resolves to ("" = every interface),
    ``SO_REUSEADDR``, IPv6 sockets IPv6-only. Raises :class:`ListenError` naming the address."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(_BACKLOG)
                sock.setblocking(False)
        except BaseException:
            _close_all(socks)
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from exc
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


async def _close_idle_connections(server: web.Server) -> None:
    """Close the keep-alive connections that wait for a request. aiohttp's ``pre_shutdown``
    (before ``on_shutdown``) told every connection to stop after its current request, which
    ends the waiting ones' tasks, but it closes their sockets only in its own shutdown, after
    the drain: a client (or load balancer) reusing one meanwhile would wait for nothing.
    Connections busy with a request close after its answer (aiohttp)."""
    await asyncio.sleep(0)  # the waiting connections' tasks see their cancelled waiter
    for conn in server.connections:
        task = conn._task_handler  # aiohttp 3.14: the connection's request loop
        if task is None or task.done():
            conn.force_close()


async def reload_logged(gateway: Gateway) -> bool:
    """Reload the config file (SIGHUP); a bad file is logged (by ``reload_from_file``, as
    for ``POST /admin/reload``) and the old config stays. Any other failure (counted as
    ``error`` by ``reload_from_file``) is logged with its traceback, naming the file
    (``reload.log_reload_failure``, as for ``POST /admin/reload``); the gateway serves on.
    Never raises (but cancellation): SIGHUP's task has no one to raise to."""
    try:
        await reload_from_file(gateway)
    except ConfigError:
        return False
    except Exception:
        log_reload_failure(gateway, "SIGHUP")
        return False
    return True


async def serve_until_signalled(
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    config_path: str | Path | None = None,
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (a second signal cuts the
    requests still running at once). SIGHUP reloads ``config_path`` (when given) without
    dropping requests."""
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: end the shutdown delay, cut the drain short
    loop = asyncio.get_running_loop()
    gateways: list[Gateway] = []

    def on_stop(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: shutting down", sig.name)
            stop.set()
        elif gateways:
            log.info("%s again: cutting the requests still running now", sig.name)
            hurry.set()
            gateways[0].proxy.end_drain()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_stop, sig)
    reloads: set[asyncio.Task[bool]] = set()
    async with running_gateway(config, host=host, port=port, config_path=config_path) as running:
        gateways.append(running.gateway)
        if config_path is not None:

            def on_hup() -> None:
                task = loop.create_task(reload_logged(running.gateway))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, on_hup)
        pool = running.gateway.pool  # drained replicas are healthy, if out of rotation
        healthy = sum(pool.is_healthy(rid) for rid in pool.replica_ids)
        draining = sum(pool.is_draining(rid) for rid in pool.replica_ids)
        log.info(
            "loragate gateway listening on %s (%d/%d replicas healthy%s, policy %s)",
            running.url,
            healthy,
            len(config.replicas),
            f", {draining} draining" if draining else "",
            running.gateway.policy.name,
        )
        await stop.wait()
        await shutdown_delay(running.gateway, hurry)


async def shutdown_delay(gateway: Gateway, hurry: asyncio.Event) -> None:
    """The shutdown's first step in ``loragate serve``: ``GET /readyz`` answers 503 from now
    on, and for ``server.shutdown_delay_s`` (as the config in force says; 0: no delay) the
    gateway goes on accepting connections and serving requests, or until ``hurry`` is set (a
    second signal). Kubernetes sends SIGTERM and removes the pod from its Service's endpoints
    at the same time, so for a few seconds new connections still arrive: refused, they would
    fail; this way they are served, and the drain that follows finds them in flight."""
    gateway.shutting_down = True
    delay_s = gateway.config.server.shutdown_delay_s
    if delay_s <= 0 or hurry.is_set():
        return
    log.info(
        "shutdown: still accepting connections for %g s (server.shutdown_delay_s; /readyz "
        "answers 503); %s in flight",
        delay_s,
        _requests(gateway.proxy.in_flight),
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), timeout=delay_s)


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"
