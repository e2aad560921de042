"""A poll that times out is weak evidence (a busy host can delay a healthy replica's answer):
a replica leaves rotation only after ``poller.timeouts_to_unhealthy`` (2 by default) polls in
a row time out, and ``/admin/replicas`` shows the count; a bad answer still takes it out at
once. Over loopback: a stub vLLM whose ``/health`` stalls (never answers) for the next N polls."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import BASE, gateway_config, serving

from loragate.gateway import running_gateway
from vllm_stub import StubVllm

TOKEN = "admin-s3cret"


class _StallingHealth(StubVllm):
    """``GET /health`` never answers while ``stalls`` > 0 (each stalled request uses one)."""

    def __init__(self) -> None:
        super().__init__(BASE)
        self.stalls = 0
        self._release: asyncio.Future[None] | None = None

    async def _health(self, request: web.Request) -> web.Response:
        if self.stalls > 0:
            self.stalls -= 1
            if self._release is None:
                self._release = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._release)
        return await super()._health(request)

    def release(self) -> None:
        if self._release is not None and not self._release.done():
            self._release.set_result(None)


async def _replica(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(url + "/admin/replicas/r0", headers=headers) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
    return body


@pytest.mark.parametrize("configured", [None, 3])
async def test_a_replica_leaves_after_timeouts_in_a_row_not_one(
    configured: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", TOKEN)
    needed = configured or 2
    # Only the stalled polls time out (they never answer); 1 s leaves the others room on a
    # busy host (no timing is asserted: a stalled poll times out whatever the timeout).
    poller: dict[str, Any] = {"interval_s": 3600, "timeout_s": 1.0}
    if configured is not None:
        poller["timeouts_to_unhealthy"] = configured
    stub = _StallingHealth()
    try:
        async with serving(stub.app) as (url, _):
            cfg = gateway_config([url], poller=poller)
            async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
                pool = gw.gateway.pool
                assert pool.is_healthy("r0")
                # One slow poll, then an answer: never out of rotation.
                stub.stalls = 1
                await pool.poll_once()
                seen = await _replica(http, gw.url)
                assert seen["healthy"] and seen["poll_timeouts_in_a_row"] == 1
                assert "timed out" in (seen["last_error"] or "")
                await pool.poll_once()
                seen = await _replica(http, gw.url)
                assert seen["healthy"] and seen["poll_timeouts_in_a_row"] == 0
                assert seen["last_error"] is None
                # `needed` in a row: out at the last one, back with the next answer.
                stub.stalls = needed
                for n in range(1, needed + 1):
                    await pool.poll_once()
                    seen = await _replica(http, gw.url)
                    assert seen["poll_timeouts_in_a_row"] == n
                    assert seen["healthy"] is (n < needed)
                await pool.poll_once()
                seen = await _replica(http, gw.url)
                assert seen["healthy"] and seen["poll_timeouts_in_a_row"] == 0
                # A bad answer is strong evidence: out at once, and it ends a run of timeouts.
                stub.stalls = 1
                await pool.poll_once()
                stub.health_status = 503
                await pool.poll_once()
                seen = await _replica(http, gw.url)
                assert not seen["healthy"] and seen["poll_timeouts_in_a_row"] == 0
    finally:
        stub.release()


async def test_a_refused_connect_still_takes_a_replica_out_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAGATE_ADMIN_TOKEN", TOKEN)
    live, gone = StubVllm(BASE), StubVllm(BASE)
    async with serving(live.app) as (live_url, _), serving(gone.app) as (gone_url, runner):
        cfg = gateway_config([gone_url, live_url], poller={"interval_s": 3600, "timeout_s": 1.0})
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
            pool = gw.gateway.pool
            assert pool.is_healthy("r0")
            await runner.cleanup()  # nothing listens there any more
            await pool.poll_once()
            seen = await _replica(http, gw.url)
    assert not seen["healthy"] and seen["poll_timeouts_in_a_row"] == 0
