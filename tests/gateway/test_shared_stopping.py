"""A replica draining under vLLM's ``--shutdown-timeout`` (``/health`` 200, new requests refused
with a 500), with two gateway instances on one real redis-server: the instance whose request is
refused retries it elsewhere and holds the replica out of rotation, and the hold is shared, so
the other instance stops routing there at its next refresh instead of paying a failed try (a
retry, extra latency) of its own; a poll of either instance that finds the replica gone ends
the hold for both. Before, the hold was per instance: every instance paid one retry to learn it.

Over loopback: ``loragate replica --shutdown-timeout`` as a subprocess SIGTERMed with a long
request in flight, a simulated replica, scripted replicas, the openai SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from draining import DRAIN_500, draining_replica
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving_replicas,
)
from metric_counts import counts
from shared_cluster import eventually

from loragate.core.clock import VirtualClock
from loragate.core.config import GatewayConfig
from loragate.gateway import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from redis_fixture import RedisServer
from vllm_stub import vllm_error

TOKEN = "stopping-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(
    urls: list[str], redis_url: str, prefix: str, *, poll_s: float, poll_timeout_s: float = 2.0
) -> GatewayConfig:
    return gateway_config(
        urls,
        routing="round_robin",
        admin={"token": TOKEN},
        poller={"interval_s": poll_s, "timeout_s": poll_timeout_s},
        state={
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": prefix,
            "refresh_s": 0.05,
            "op_timeout_s": 0.5,
            "maintenance_interval_s": 0.02,
        },
    )


async def _replica(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    async with http.get(f"{url}/admin/replicas/{rid}", headers=AUTH) as resp:
        assert resp.status == 200
        out: dict[str, Any] = await resp.json()
        return out


async def test_the_other_instance_sends_nothing_to_a_replica_one_found_draining(
    redis_server: RedisServer,
) -> None:
    prefix = f"stop-{uuid.uuid4().hex[:8]}:"
    other = ReplicaConfig(served_model_name=BASE, profile="fast", seed=1)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        r0_url = await stack.enter_async_context(draining_replica(http))
        r1 = await stack.enter_async_context(run_replica(other, port=0))
        cfg = _config([r0_url, r1.url], redis_server.url, prefix, poll_s=0.2)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_a = await stack.enter_async_context(openai_client(gw_a.url))
        client_b = await stack.enter_async_context(openai_client(gw_b.url))
        # Both instances polled r0 (/health 200): both route there.
        for gw in (gw_a, gw_b):
            assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r0", "r1"]

        # Through A: the request round-robin sends to r0 is refused and retried on r1.
        for _ in range(4):
            raw = await client_a.completions.with_raw_response.create(
                model=BASE, prompt="p", max_tokens=2
            )
            assert raw.parse().choices[0].finish_reason == "length"
            assert raw.headers["X-Loragate-Replica"] == "r1"
        assert await counts(http, gw_a.url, "loragate_upstream_retries_total") == {
            ("r0", "engine_stopped"): 1
        }

        # B holds r0 from its next refresh on, though its own polls of r0 succeed.
        seen = await eventually(
            lambda: _replica(http, gw_b.url, "r0"),
            lambda r: r["stopping_hold_left_s"] is not None,
        )
        assert seen["stopping_hold_left_s"] is not None, seen
        assert seen["healthy"] is False and DRAIN_500 in seen["last_error"]
        await gw_b.gateway.pool.poll_once()  # /health 200: held still

        # Through B: every request answered by r1 at the first try, none sent to r0.
        for i in range(8):
            raw = await client_b.completions.with_raw_response.create(
                model=BASE, prompt="p", max_tokens=2, stream=i % 2 == 1
            )
            answer = raw.parse()
            chunks = [c async for c in answer] if i % 2 else [answer]
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            assert raw.headers["X-Loragate-Replica"] == "r1"
        assert await counts(http, gw_b.url, "loragate_upstream_retries_total") == {}
        assert await counts(http, gw_b.url, "loragate_requests_total") == {("r1", "200"): 8}


class DrainingScripted(ScriptedReplica):
    """Answers completions with vLLM's drain 500 while ``draining``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.draining = False
        self.health_delay_s = 0.0  # > the poll timeout: its polls time out

    async def _health(self, request: web.Request) -> web.Response:
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        return await super()._health(request)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if not self.draining:
            return await super()._answer(request)
        self.requests.append(await request.json())
        return vllm_error(500, DRAIN_500, "InternalServerError")


@pytest.fixture
async def scripted() -> AsyncIterator[list[DrainingScripted]]:
    async with serving_replicas(DrainingScripted) as out:
        yield out


async def test_a_poll_of_one_instance_that_finds_the_replica_gone_ends_the_hold_for_both(
    redis_server: RedisServer, scripted: list[DrainingScripted]
) -> None:
    r0, _ = scripted
    r0.draining = True
    prefix = f"stop-{uuid.uuid4().hex[:8]}:"
    urls = [r.url for r in scripted]
    async with contextlib.AsyncExitStack() as stack:
        # A polls every 0.1 s; B only when the test says (so only A can see r0 go away).
        gw_a = await stack.enter_async_context(
            running_gateway(_config(urls, redis_server.url, prefix, poll_s=0.1), port=0)
        )
        gw_b = await stack.enter_async_context(
            running_gateway(_config(urls, redis_server.url, prefix, poll_s=3600), port=0)
        )
        client_a = await stack.enter_async_context(openai_client(gw_a.url))
        client_b = await stack.enter_async_context(openai_client(gw_b.url))
        pool_a, pool_b = gw_a.gateway.pool, gw_b.gateway.pool

        async def held(pool: Any) -> bool:
            return bool(pool.stopping_for_s("r0"))

        done = await client_a.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"  # r0 refused it: retried
        assert len(r0.requests) == 1
        assert await eventually(lambda: held(pool_b), bool)
        for _ in range(4):
            done = await client_b.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert len(r0.requests) == 1  # B sent it nothing

        # r0 goes away: A's poll fails, which ends the hold for A and, through Redis, for B
        # (which did not poll). Then a new server answers at its URL.
        r0.health_status = 503
        assert not await eventually(lambda: held(pool_b), lambda h: not h)
        assert not await held(pool_a)
        r0.health_status, r0.draining = 200, False
        await pool_b.poll_once()
        assert [s.replica_id for s in pool_b.healthy_snapshots()] == ["r0", "r1"]
        assert pool_b.last_error("r0") is None
        answered = set()
        for _ in range(2):
            done = await client_b.completions.create(model=BASE, prompt="p", max_tokens=1)
            answered.add(done.choices[0].text)
        assert answered == {"hi from r0", "hi from r1"}
        http = await stack.enter_async_context(aiohttp.ClientSession())
        assert await counts(http, gw_b.url, "loragate_upstream_retries_total") == {}
        assert await counts(http, gw_a.url, "loragate_upstream_retries_total") == {
            ("r0", "engine_stopped"): 1
        }


async def test_a_poll_that_times_out_ends_the_hold_for_neither_instance(
    redis_server: RedisServer, scripted: list[DrainingScripted]
) -> None:
    """A draining vLLM may be slow to answer its /health: a poll that timed out did not find
    it gone. Before, it ended the hold here and, through Redis, on every instance."""
    r0, _ = scripted
    r0.draining = True
    prefix = f"stop-{uuid.uuid4().hex[:8]}:"
    urls = [r.url for r in scripted]
    async with contextlib.AsyncExitStack() as stack:
        # A polls every 0.1 s (timeout 0.2 s); B only when the test says.
        gw_a = await stack.enter_async_context(
            running_gateway(
                _config(urls, redis_server.url, prefix, poll_s=0.1, poll_timeout_s=0.2), port=0
            )
        )
        gw_b = await stack.enter_async_context(
            running_gateway(_config(urls, redis_server.url, prefix, poll_s=3600), port=0)
        )
        client_a = await stack.enter_async_context(openai_client(gw_a.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        pool_a, pool_b = gw_a.gateway.pool, gw_b.gateway.pool

        async def held(pool: Any) -> bool:
            return bool(pool.stopping_for_s("r0"))

        done = await client_a.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"  # r0 refused it: retried
        assert await eventually(lambda: held(pool_b), bool)

        # r0's /health answers late: A's polls time out (two of them, so that the release
        # the old code wrote after the first had reached B's refresh).
        r0.health_delay_s = 5.0

        async def timeouts() -> int:
            polls = await counts(http, gw_a.url, "loragate_replica_poll_failures_total")
            return polls.get(("r0", "timeout"), 0)

        assert await eventually(timeouts, lambda n: n >= 2) >= 2
        assert await held(pool_a)  # before: released at the first timed-out poll
        assert await held(pool_b)  # before: released through Redis

        # Then r0 goes away (its /health answers 503 at once): the hold ends for both.
        r0.health_delay_s, r0.health_status = 0.0, 503
        assert not await eventually(lambda: held(pool_b), lambda h: not h)
        assert not await held(pool_a)


async def test_a_hold_reported_again_within_its_second_outlives_an_older_release(
    redis_server: RedisServer, scripted: list[DrainingScripted]
) -> None:
    """An instance writes its hold once a second at most: a refusal within that second after
    another instance's release (its poll found the replica gone, and a new process at the URL
    drains at once) is held here, and shared once the second is over. Before, the next refresh
    showing the (older) release ended this instance's fresh hold, and it was never shared."""
    r0, _ = scripted
    r0.draining = True
    prefix = f"stop-{uuid.uuid4().hex[:8]}:"
    urls = [r.url for r in scripted]
    clock = VirtualClock(1000.0)  # A's: its second is over when the test says
    async with contextlib.AsyncExitStack() as stack:
        cfg = _config(urls, redis_server.url, prefix, poll_s=3600)
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0, clock=clock))
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_a = await stack.enter_async_context(openai_client(gw_a.url))
        pool_a, pool_b = gw_a.gateway.pool, gw_b.gateway.pool
        shared_a = gw_a.gateway.shared

        async def held(pool: Any) -> bool:
            return bool(pool.stopping_for_s("r0"))

        done = await client_a.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"  # r0 refused it: A holds it (written)
        assert await eventually(lambda: held(pool_b), bool)

        # B's poll finds r0 gone (its release is queued), then A's request already sent there
        # comes back refused (A's second is not over: not written).
        r0.health_status = 503
        await pool_b.poll_once()
        r0.health_status = 200
        pool_a.report_stopping("r0", f"answering ({r0.url}): {DRAIN_500}")

        async def shows_release() -> bool:
            return "r0" not in shared_a.store.stopping()

        assert await eventually(shows_release, bool)  # A's view of the store has the release
        shared_a.sync_stopping()  # (one more round, whatever the loop did meanwhile)
        assert await held(pool_a)  # before: ended by the older release

        clock.advance_by(1.0)  # A's second is over: its hold is written, B holds r0 again
        assert await eventually(lambda: held(pool_b), bool)
        assert await held(pool_a)


async def test_while_redis_is_down_the_hold_is_kept_here_and_shared_once_it_is_back(
    redis_server: RedisServer, scripted: list[DrainingScripted]
) -> None:
    r0, _ = scripted
    prefix = f"stop-{uuid.uuid4().hex[:8]}:"
    cfg = _config([r.url for r in scripted], redis_server.url, prefix, poll_s=0.1)
    async with contextlib.AsyncExitStack() as stack:
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_a = await stack.enter_async_context(openai_client(gw_a.url))
        pool_a, shared_a = gw_a.gateway.pool, gw_a.gateway.shared
        await asyncio.to_thread(redis_server.stop)  # data lost, as after a crash
        r0.draining = True
        for _ in range(2):  # round robin: r0 within two requests, refused and retried
            done = await client_a.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert shared_a.degraded
        # Degraded: the hold is kept here, over the polls (which succeed) and refresh rounds.
        for _ in range(3):
            await pool_a.poll_once()
            await asyncio.sleep(0.05)
            assert pool_a.stopping_for_s("r0") is not None
        assert [s.replica_id for s in pool_a.healthy_snapshots()] == ["r1"]

        # Redis is back (empty): A's resync writes the hold back, with the time it has left;
        # an instance started then holds r0 from its first poll on and sends it nothing.
        await asyncio.to_thread(redis_server.start)
        assert not await eventually(lambda: _async(shared_a.degraded), lambda d: not d)
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        client_b = await stack.enter_async_context(openai_client(gw_b.url))
        assert gw_b.gateway.pool.stopping_for_s("r0") is not None
        for _ in range(4):
            done = await client_b.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert len(r0.requests) == 1  # the one A sent


async def _async(value: bool) -> bool:
    return value
