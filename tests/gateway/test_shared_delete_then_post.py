"""``DELETE /admin/adapters/N`` on one gateway instance, then at once ``POST`` of the same name
on another (one real redis-server, four simulated replicas): the registering instance's view
of where the adapter sits predates the deletion (its last poll listed it where the deletion
has just unloaded it), yet the 201's ``loaded_on`` names a replica that lists the adapter in
its own ``/v1/models``, and the next request for it is served without an ``adapter_missing``
retry.

Before: ``loaded_on`` named the replica the deletion had unloaded, on the strength of the
registering instance's last poll, and no load was sent there (the pool's ``ensure_adapter``
returned early); a request routed there got vLLM's 404 and used up its retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
from metric_counts import counts
from shared_cluster import AUTH, eventually, sdk, shared_config, twin_replicas

from loragate.core.config import GatewayConfig
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

N_REPLICAS = 4
ROUNDS = 6
# The registering instance's poller does not come round during the test: its view of the
# replicas is its last poll's (and what it learns through the shared state).
SLOW_POLL_S = 3600.0
# An instance whose view of the shared state is never refreshed during a test.
STALE_REFRESH_S = 3600.0
RETRIES = "loragate_upstream_retries_total"
# The longest a test waits for a state it asserts (a hang guard, not a timing assertion): on a
# saturated host the instances' maintenance rounds and refreshes run late.
WAIT_S = 30.0
# Maintenance rounds far apart (a saturated host runs them late).
SLOW_ROUNDS_S = 1.0


def _with_poll(cfg: GatewayConfig, interval_s: float) -> GatewayConfig:
    return dataclasses.replace(cfg, poller=dataclasses.replace(cfg.poller, interval_s=interval_s))


async def _listed(http: aiohttp.ClientSession, replica_url: str) -> set[str]:
    async with http.get(replica_url + "/v1/models") as resp:
        data = await resp.json()
    return {m["id"] for m in data["data"] if m.get("parent")}


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + "/admin/adapters", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _delete(http: aiohttp.ClientSession, url: str, name: str) -> tuple[int, Any]:
    async with http.delete(f"{url}/admin/adapters/{name}", headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_post_right_after_another_instances_delete_loads_where_it_says(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, N_REPLICAS, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        urls = {f"r{i}": r.url for i, r in enumerate(replicas)}
        name = "a-45"
        write_adapter_folder(str(tmp_path / name), rank=8)
        body = {"name": name, "path": str(tmp_path / name)}
        gw0 = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw1 = await stack.enter_async_context(running_gateway(_with_poll(cfg, SLOW_POLL_S), port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client1 = await stack.enter_async_context(sdk(gw1.url))
        pool0, pool1 = gw0.gateway.pool, gw1.gateway.pool

        status, answer = await _post(http, gw1.url, body)
        assert status == 201, answer
        for round_ in range(ROUNDS):
            (rid,) = answer["loaded_on"]
            assert answer["untried"] is False, answer
            # The replica it names has it: its own /v1/models says so.
            assert name in await _listed(http, urls[rid]), (round_, rid, answer)
            # The next request is served, with no adapter_missing retry on either instance.
            before = await counts(http, gw1.url, RETRIES)
            done = await client1.completions.create(model=name, prompt="x", max_tokens=2)
            assert done.choices, done
            after = await counts(http, gw1.url, RETRIES)
            missing = {k: n for k, n in after.items() if k[1] == "adapter_missing"}
            assert missing == {k: n for k, n in before.items() if k[1] == "adapter_missing"}, (
                round_,
                after,
            )
            # gw1 believes (its last poll or its own load) the adapter sits where it loaded it.
            assert pool1.is_registered(rid, name)

            # gw0 knows where it sits (its poll, or the shared residency), so its DELETE
            # unloads it there...
            def known(r: str = rid) -> bool:
                return pool0.is_registered(r, name) or (
                    name in gw0.gateway.shared.residency_of(r).registered
                )

            async def probe() -> bool:
                return known()

            assert await eventually(probe, lambda ok: ok), (round_, rid)
            status, deleted = await _delete(http, gw0.url, name)
            assert status == 200, deleted
            assert rid in deleted["unloaded_from"], (round_, deleted)
            assert name not in await _listed(http, urls[rid])
            # ... and gw1 registers it again at once.
            status, answer = await _post(http, gw1.url, body)
            assert status == 201, (round_, answer)


async def test_the_deleting_instance_does_not_unload_the_name_registered_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The deleting instance's view keeps the tombstone (and lacks the name) until its next
    refresh; its poller must not unload, as deleted, the adapter another instance registered
    again and loaded meanwhile. (Before: it did, and the next request there got vLLM's 404.)
    Here it never refreshes: only the store itself can tell it."""
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 2, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        urls = {f"r{i}": r.url for i, r in enumerate(replicas)}
        name = "a-46"
        write_adapter_folder(str(tmp_path / name), rank=8)
        body = {"name": name, "path": str(tmp_path / name)}
        stale = dataclasses.replace(
            cfg, state=dataclasses.replace(cfg.state, refresh_s=STALE_REFRESH_S)
        )
        gw0 = await stack.enter_async_context(running_gateway(stale, port=0))
        gw1 = await stack.enter_async_context(running_gateway(cfg, port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        status, answer = await _post(http, gw0.url, body)
        assert status == 201, answer
        status, deleted = await _delete(http, gw0.url, name)
        assert status == 200, deleted
        status, answer = await _post(http, gw1.url, body)
        assert status == 201, answer
        (rid,) = answer["loaded_on"]
        assert name in await _listed(http, urls[rid])

        # gw0's polls see the replica list the name its view says was deleted; it asks the
        # store, which says registered again: it serves it too, and leaves it loaded.
        async def served() -> bool:
            return name in gw0.gateway.catalog.adapters

        assert await eventually(served, lambda ok: ok)
        assert name in await _listed(http, urls[rid])
        client0 = await stack.enter_async_context(sdk(gw0.url))
        done = await client0.completions.create(model=name, prompt="x", max_tokens=2)
        assert done.choices, done


async def test_another_instances_unload_reaches_this_instances_pool_before_its_poll(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Another instance unloads an adapter from a replica (as its planner retires a cold one):
    the shared residency says so at once, and this instance's pool stops counting on the
    replica holding it without waiting for its own next poll (here: never), so its next
    request for the adapter is not sent there into vLLM's 404 (the adapter_missing retry)."""
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        gw0 = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw1 = await stack.enter_async_context(running_gateway(_with_poll(cfg, SLOW_POLL_S), port=0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client1 = await stack.enter_async_context(sdk(gw1.url))
        await client1.completions.create(model="lora-0", prompt="x", max_tokens=2)
        pool1 = gw1.gateway.pool
        assert pool1.is_registered("r0", "lora-0")

        async def known0() -> bool:
            return "lora-0" in gw0.gateway.shared.residency_of("r0").registered

        assert await eventually(known0, lambda ok: ok, timeout_s=WAIT_S)
        await gw0.gateway.pool.unload_adapter("r0", "lora-0")
        assert "lora-0" not in await _listed(http, replicas[0].url)

        # gw1's shared view learns it at its next refresh (late on a saturated host)...
        async def shared1() -> bool:
            return "lora-0" in gw1.gateway.shared.residency_of("r0").registered

        assert not await eventually(shared1, lambda held: not held, timeout_s=WAIT_S)

        # ... and its pool, at the maintenance round after that (not at its next poll: never).
        async def registered1() -> bool:
            return pool1.is_registered("r0", "lora-0")

        assert not await eventually(registered1, lambda held: not held, timeout_s=WAIT_S)
        before = await counts(http, gw1.url, RETRIES)
        done = await client1.completions.create(model="lora-0", prompt="x", max_tokens=2)
        assert done.choices, done
        assert await counts(http, gw1.url, RETRIES) == before


async def test_an_unload_right_after_this_instances_load_reaches_its_pool(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """As above, with this instance's maintenance rounds far apart (as on a saturated host):
    its load ends after one round, and the next round's refresh already lacks the adapter
    (the other instance unloaded it meanwhile). The pool keeps it that round (the shared view
    may predate its load) and must drop it at a later one. (Before: the drop was handed to it
    once, kept, and never again: its pool counted on the adapter there until its next poll.)"""
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 1))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 1)
        gw0 = await stack.enter_async_context(running_gateway(cfg, port=0))
        slow = _with_poll(cfg, SLOW_POLL_S)
        slow = dataclasses.replace(
            slow, state=dataclasses.replace(slow.state, maintenance_interval_s=SLOW_ROUNDS_S)
        )
        gw1 = await stack.enter_async_context(running_gateway(slow, port=0))
        client1 = await stack.enter_async_context(sdk(gw1.url))
        await client1.completions.create(model="lora-0", prompt="x", max_tokens=2)
        pool1 = gw1.gateway.pool
        assert pool1.is_registered("r0", "lora-0")

        async def known0() -> bool:
            return "lora-0" in gw0.gateway.shared.residency_of("r0").registered

        assert await eventually(known0, lambda ok: ok, timeout_s=WAIT_S)
        await gw0.gateway.pool.unload_adapter("r0", "lora-0")

        async def shared1() -> bool:
            return "lora-0" in gw1.gateway.shared.residency_of("r0").registered

        assert not await eventually(shared1, lambda held: not held, timeout_s=WAIT_S)

        async def registered1() -> bool:
            return pool1.is_registered("r0", "lora-0")

        assert not await eventually(registered1, lambda held: not held, timeout_s=WAIT_S)
