"""Run a gateway app on a socket: in-process for tests and the demo, or until a signal for
``loragate serve``. The event loop (uvloop or not) is the caller's choice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from loragate.core.config import GatewayConfig
from loragate.core.errors import ConfigError
from loragate.gateway.app import GATEWAY, Gateway, create_app
from loragate.gateway.protocol_errors import OpenAIErrorAppRunner
from loragate.gateway.reload import reload_from_file

log = logging.getLogger(__name__)


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
    shutdown_timeout_s: float = 5.0,
    **create_app_kwargs: Any,
) -> AsyncIterator[RunningGateway]:
    """Serve a gateway built by ``create_app(config, **create_app_kwargs)`` until the block
    exits. ``port=0`` picks a free port; ``host``/``port`` default to ``config.server``.
    Raises :class:`ListenError` if the socket cannot be bound."""
    host = config.server.host if host is None else host
    port = config.server.port if port is None else port
    app = create_app(config, **create_app_kwargs)
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
        shutdown_timeout=shutdown_timeout_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {host}:{port}: {reason}") from exc
        bound = runner.addresses[0]
        actual_host, actual_port = str(bound[0]), int(bound[1])
        url_host = f"[{actual_host}]" if ":" in actual_host else actual_host
        yield RunningGateway(
            url=f"http://{url_host}:{actual_port}", host=actual_host, port=actual_port, app=app
        )
    finally:
        await runner.cleanup()


async def reload_logged(gateway: Gateway) -> bool:
    """Reload the config file (SIGHUP); a bad file is logged and the old config stays."""
    try:
        await reload_from_file(gateway)
    except ConfigError as exc:
        log.error("config reload rejected, keeping the running config: %s", exc)
        return False
    return True


async def serve_until_signalled(
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    config_path: str | Path | None = None,
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully. SIGHUP reloads
    ``config_path`` (when given) without dropping requests."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    async with running_gateway(config, host=host, port=port, config_path=config_path) as running:
        if config_path is not None:

            def on_hup() -> None:
                task = loop.create_task(reload_logged(running.gateway))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, on_hup)
        healthy = len(running.gateway.pool.healthy_snapshots())
        log.info(
            "loragate gateway listening on %s (%d/%d replicas healthy, policy %s)",
            running.url,
            healthy,
            len(config.replicas),
            running.gateway.policy.name,
        )
        await stop.wait()
        log.info("shutting down")
