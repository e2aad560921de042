"""Redis goes away under traffic and comes back: no client request fails, /health says
degraded during the outage (and /metrics counts it), the gateway resynchronises after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiohttp
import openai
import pytest
from shared_cluster import eventually, get_json, sdk, shared_config, twin_replicas

from loragate.gateway import running_gateway
from loragate.state import KeySpace, RedisStore
from redis_fixture import RedisServer

N_ADAPTERS = 4
MAX_REQUESTS = 3000  # bounds the traffic loop (with the deadline below)
DEADLINE_S = 60.0


class Traffic:
    """Workers sending small completions in a loop until stopped (bounded)."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def worker(self, k: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        i = k
        while not self.stop.is_set() and self.ok + len(self.failures) < MAX_REQUESTS:
            if loop.time() > deadline:
                self.failures.append("deadline")
                return
            try:
                await self.client.completions.create(
                    model=f"lora-{i % N_ADAPTERS}", prompt="x", max_tokens=2
                )
                self.ok += 1
            except openai.APIError as exc:
                self.failures.append(repr(exc))
            i += 3

    async def at_least(self, n: int) -> None:
        target = self.ok + n
        await eventually(self._count, lambda c: c >= target or bool(self.failures))

    async def _count(self) -> int:
        return self.ok


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_redis_outage_under_traffic(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="loragate.state")
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        traffic = Traffic(await stack.enter_async_context(sdk(gw.url)))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def health() -> str:
            return str((await get_json(http, gw.url + "/health"))["status"])

        async def metrics() -> str:
            async with http.get(gw.url + "/metrics") as resp:
                return await resp.text()

        workers = [asyncio.create_task(traffic.worker(k)) for k in range(3)]
        try:
            await traffic.at_least(20)
            assert await health() == "ok"
            assert _metric(await metrics(), "loragate_state_degraded") == 0.0

            await asyncio.to_thread(redis_server.stop)  # data lost, as after a crash
            assert await eventually(health, lambda s: s == "degraded") == "degraded"
            text = await metrics()
            assert _metric(text, "loragate_state_degraded") == 1.0
            assert _metric(text, "loragate_state_errors_total") >= 1.0
            await traffic.at_least(30)  # routing goes on from the local view

            assert _metric(text, "loragate_state_resyncs_total") == 0.0

            await asyncio.to_thread(redis_server.start)
            assert await eventually(health, lambda s: s == "ok", timeout_s=20.0) == "ok"
            text = await metrics()
            assert _metric(text, "loragate_state_resyncs_total") == 1.0
            assert _metric(text, "loragate_state_journal_dropped_total") == 0.0
            await traffic.at_least(20)
        finally:
            traffic.stop.set()
            await asyncio.gather(*workers)

        assert traffic.failures == []
        assert traffic.ok >= 70
        # Logged once for the outage (and once when it ended), not per request.
        outage_logs = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1
        # Resynchronised: the restarted (empty) Redis got the registry and residency back,
        # and no lease leaked: in flight drops to zero everywhere.
        probe = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        try:
            shared = await probe.snapshot()
        finally:
            await probe.close()
        assert set(shared.replicas) == {"r0", "r1"}
        assert any(shared.residency_of(r).registered for r in ("r0", "r1"))

        async def in_flight() -> list[int]:
            view = await get_json(http, gw.url + "/admin/replicas")
            return [r["in_flight"] for r in view["replicas"]]

        assert await eventually(in_flight, lambda ns: ns == [0, 0]) == [0, 0]


async def test_gateway_starts_and_serves_while_redis_is_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await asyncio.to_thread(redis_server.stop)
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, N_ADAPTERS))
        cfg = shared_config(replicas, tmp_path, redis_server.url, N_ADAPTERS)
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        client = await stack.enter_async_context(sdk(gw.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def health() -> str:
            return str((await get_json(http, gw.url + "/health"))["status"])

        assert await health() == "degraded"
        for n in range(N_ADAPTERS):
            done = await client.completions.create(model=f"lora-{n}", prompt="x", max_tokens=1)
            assert done.model == f"lora-{n}"
        await asyncio.to_thread(redis_server.start)
        assert await eventually(health, lambda s: s == "ok", timeout_s=20.0) == "ok"
        # What the gateway learnt while Redis was down is in Redis now.
        probe = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        try:
            shared = await probe.snapshot()
        finally:
            await probe.close()
        routed = set().union(*(shared.residency_of(r).registered for r in ("r0", "r1")))
        assert routed == {f"lora-{n}" for n in range(N_ADAPTERS)}
