"""Run a gateway app on a socket: in-process for tests and the demo, or until a signal for
``loragate serve``. The event loop (uvloop or not) is the caller's choice.

Start-up binds the listening socket before anything else: a port in use (or an address not on
this host) fails at once with :class:`ListenError`, before the app starts or polls a replica.

Shutdown (leaving :func:`running_gateway`; SIGTERM/SIGINT in ``loragate serve``), as a load
balancer drains: ``GET /readyz`` answers 503 from its start. In ``loragate serve`` the gateway
first keeps accepting and serving for ``server.shutdown_delay_s`` (default 0), the time
Kubernetes needs to take the pod out of its Service's endpoints after the SIGTERM
(:func:`shutdown_delay`). Then the listening socket closes (new connections are refused),
after the connections waiting in its backlog were accepted: every connection the kernel
accepted is answered (``listener_close``). Idle keep-alive connections close after
IDLE_GRACE_S in ``loragate serve`` (at once in-process), once no request waits unread on them;
a connection that has not sent its request yet gets up to FIRST_REQUEST_GRACE_S to send it.
Requests arriving meanwhile are served, every answer from then on saying ``Connection:
close``. The requests in flight may finish within the drain period
(``server.shutdown_timeout_s``); those still running then are answered (a 503, or a final SSE
error event once a stream started) and their upstream connections closed (vLLM aborts the
generations). The admin writes still running (``POST``/``PUT /admin/adapters``, which run to
their end even if their client left) may finish within the same drain period; those left then
are cancelled, each logged. The whole shutdown is bounded by the delay, the longer of
IDLE_GRACE_S and FIRST_REQUEST_GRACE_S, the drain period, about 3 s of grace (CUT_GRACE_S, then 2 x
HANDLER_GRACE_S for handlers outside the proxy) and the app cleanup.
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
from loragate.core.tasks import cancel_and_wait
from loragate.gateway.app import GATEWAY, Gateway, create_app
from loragate.gateway.listener_close import (
    ConnectionCounts,
    ConnectionKeeper,
    accept_waiting,
    adopt,
)
from loragate.gateway.protocol_errors import OpenAIErrorAppRunner
from loragate.gateway.reload import log_reload_failure, reload_from_file

log = logging.getLogger(__name__)

# After the drain period: how long the answers of the requests cut then may take to go out.
CUT_GRACE_S = 1.0
# Then aiohttp's own shutdown, for handlers outside the proxy (admin, /health, /metrics; they
# had the drain period too): it waits this long, cancels them and waits this long again.
HANDLER_GRACE_S = 1.0
# A connection accepted but silent when the listener closes: how long it may take to send its
# first request (a client sends it at once; over a network it arrives a round trip later).
FIRST_REQUEST_GRACE_S = 1.0
# ``loragate serve``: how long idle keep-alive connections stay open after the listener closed
# (their requests are served): a busy client reuses one before it sees the close. Measured with
# ``loragate loadtest`` (servegen spec, 25 req/s): closing them at once reset 1-2 requests a run.
IDLE_GRACE_S = 1.0
_BACKLOG = 128  # the listening sockets' (aiohttp's default)
_DRAIN_POLL_S = 0.01  # the drain's look for requests that arrived on open connections


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
    first_request_grace_s: float = FIRST_REQUEST_GRACE_S,
    idle_grace_s: float = 0.0,
    hurry: asyncio.Event | None = None,
    **create_app_kwargs: Any,
) -> AsyncIterator[RunningGateway]:
    """Serve a gateway built by ``create_app(config, **create_app_kwargs)`` until the block
    exits, then shut down gracefully (see the module docstring); ``shutdown_timeout_s`` is the
    drain period (default: ``server.shutdown_timeout_s``), ``first_request_grace_s`` how long
    a connection silent when the listener closes may take to send its request, and
    ``idle_grace_s`` how long idle keep-alive connections stay open then (``loragate serve``:
    IDLE_GRACE_S; 0 here: closed at once, unless a request waits unread on them); setting
    ``hurry`` during the drain ends it (the requests still running are cut). ``port=0`` picks a
    free port;
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
    sites: list[tuple[web.SockSite, socket.socket]] = []
    counts = ConnectionCounts()

    async def close_after_answer(_: web.Request, response: web.StreamResponse) -> None:
        # aiohttp closes a connection after the answer it is busy with once the shutdown has
        # begun, but the answer itself still says keep-alive: a client would send its next
        # request on a connection that is about to close, and lose it. Say so in the answer.
        # (aiohttp has worked out the headers before this hook: set the header too.)
        if shutting_down:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    app.on_response_prepare.append(close_after_answer)

    async def stop_listening() -> None:
        """The shutdown after any delay, before aiohttp's own (``runner.cleanup``): accept the
        connections waiting in the listen backlog and close the listening sockets, then drain:
        the connections close as ``listener_close.ConnectionKeeper`` says while the requests
        in flight (and those that arrive on open connections meanwhile) may finish within the
        drain period; those still running then are cut (``Proxy.drain``)."""
        nonlocal shutting_down
        shutting_down = True
        gateway = app[GATEWAY]
        gateway.shutting_down = True  # /readyz: 503 (on connections still open)
        waiting: list[socket.socket] = []
        for site, sock in sites:
            waiting += accept_waiting(sock, limit=4 * _BACKLOG)
            await site.stop()  # closes ``sock`` without suspending: nothing is reset
        server = runner.server
        assert server is not None
        counts.requests_before = server.requests_count
        counts.backlog = await adopt(server, waiting)
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
        keeper = ConnectionKeeper(
            server,
            idle_grace_s=idle_grace_s,
            first_request_grace_s=first_request_grace_s,
            counts=counts,
        )
        closing = asyncio.create_task(keeper.run(), name="loragate-shutdown-connections")
        deadline = asyncio.get_running_loop().time() + period
        try:
            finished, cut = await _drain(gateway, period, closing, hurry)
        finally:
            await cancel_and_wait(closing)
        await _finish_admin_writes(gateway, deadline, hurry)
        counts.late_requests = server.requests_count - counts.requests_before
        log.info(
            "shutdown: %s finished during the drain, %d cut at its end (answered with an "
            "error); connections: %s",
            _requests(finished),
            cut,
            counts.describe(),
        )

    async def drain(_: web.Application) -> None:
        # aiohttp's on_shutdown, after ``stop_listening`` and aiohttp's pre_shutdown: close the
        # connections left waiting (at the drain's deadline, or a second signal); aiohttp's
        # own shutdown (HANDLER_GRACE_S) follows.
        if listening and runner.server is not None:
            await _close_idle_connections(runner.server)

    app.on_shutdown.append(drain)
    # handler_cancellation: a client that goes away cancels its handler, which drops the
    # upstream connection, which makes vLLM abort the generation. OpenAIErrorAppRunner: a
    # request aiohttp's HTTP parser rejects gets an OpenAI-shaped JSON error, not plain text,
    # counted in /metrics (loragate_http_errors_total); a connection that does not send a
    # complete request head within limits.client_header_timeout_s is closed (head_deadline).
    runner = OpenAIErrorAppRunner(
        app,
        on_error=app[GATEWAY].telemetry.count_http_error,
        request_ids=app[GATEWAY].request_ids,
        # (a reload replaces the config)
        head_timeout_s=lambda: app[GATEWAY].config.limits.client_header_timeout_s,
        on_head_timeout=app[GATEWAY].telemetry.count_header_timeout,
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
                site = web.SockSite(runner, sock, backlog=_BACKLOG)
                await site.start()
                sites.append((site, sock))
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
        try:
            if listening:
                await stop_listening()
        finally:
            await runner.cleanup()


async def _drain(
    gateway: Gateway, period: float, closing: asyncio.Task[None], hurry: asyncio.Event | None
) -> tuple[int, int]:
    """Wait up to ``period`` for the requests in flight, and for those that arrive on the
    connections still open (``closing``: their keeper, done once all are closed), then cut
    those still running (``Proxy.drain``); a set ``hurry`` cuts them at once. Returns
    (requests finished, requests cut)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + period
    finished = cut = 0
    while True:
        done, now_cut = await gateway.proxy.drain(
            max(0.0, deadline - loop.time()), grace_s=CUT_GRACE_S
        )
        finished, cut = finished + done, cut + now_cut
        if closing.done() or loop.time() >= deadline or (hurry is not None and hurry.is_set()):
            return finished, cut
        # Connections still open (busy, or waiting within their grace): a request may come.
        await asyncio.wait({closing}, timeout=_DRAIN_POLL_S)


async def _finish_admin_writes(
    gateway: Gateway, deadline: float, hurry: asyncio.Event | None
) -> None:
    """Wait until ``deadline`` (the drain period's end; a set ``hurry``: not at all) for the
    admin writes still running (``Gateway.admin_writes``: a ``POST``/``PUT``/``DELETE`` whose
    client may have left, its replica loads or unloads, store swap or undoing), then cancel those
    left, each logged: without this the app cleanup closed their sessions under them."""
    writes = {t for t in gateway.admin_writes if not t.done()}
    if not writes:
        return
    loop = asyncio.get_running_loop()
    left = max(0.0, deadline - loop.time())
    log.info(
        "shutdown: %d admin write(s) running, waiting up to %.3g s for them: %s",
        len(writes), left, ", ".join(sorted(t.get_name() for t in writes)),
    )  # fmt: skip
    if left > 0 and not (hurry is not None and hurry.is_set()):
        waits: set[asyncio.Future[Any]] = set(writes)
        hurried = None if hurry is None else loop.create_task(hurry.wait())
        if hurried is not None:
            waits.add(hurried)
        try:
            while writes and loop.time() < deadline and not (hurried and hurried.done()):
                await asyncio.wait(
                    waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                writes = {t for t in writes if not t.done()}
                waits = {*writes, *([hurried] if hurried is not None else [])}
        finally:
            if hurried is not None:
                await cancel_and_wait(hurried)
    for task in writes:
        log.warning(
            "shutdown: %s still running at the end of the drain period: cancelled",
            task.get_name(),
        )
        task.cancel()
    if writes:
        await asyncio.wait(writes, timeout=HANDLER_GRACE_S)


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
    async with running_gateway(
        config,
        host=host,
        port=port,
        config_path=config_path,
        idle_grace_s=IDLE_GRACE_S,
        hurry=hurry,
    ) as running:
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
