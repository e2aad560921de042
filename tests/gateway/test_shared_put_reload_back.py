"""While ``PUT /admin/adapters/N`` runs on one gateway instance, another instance on the same
redis-server does not reload a replica back to the old path.

The ``PUT`` reloads the replicas in place from the new path and swaps the shared registry once
one took it; the other instance's catalog has the old definition until its refresh after the
swap. Before, that instance's poll of a replica the ``PUT`` had just reloaded found the adapter
held "from another path than the configured one" and reloaded it back to the old path (the
``PUT``'s own instance then reloaded it forward again after the swap: a flip-flop of the
weights served under the name). Now the store holds the new path while the ``PUT`` runs, and
the other instance's poller asks it (and the registry) before reloading. Against two
``loragate replica --simulated`` processes, one SIGSTOPped so that the ``PUT`` stays under
way; every wait is bounded, no timing is asserted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from gateway_harness import gateway_config, wait_until
from paused_replicas import adapter_roots, admin_call, paused_replicas
from shared_cluster import AUTH, eventually

from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from redis_fixture import RedisServer

_BOUND_S = 30.0  # the longest a test waits for anything (a hang guard)


def _config(urls: list[str], redis_url: str, prefix: str) -> Any:
    return gateway_config(
        urls,
        admin={"token": AUTH["Authorization"].split()[1]},
        state={
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": prefix,
            "refresh_s": 0.05,
            "op_timeout_s": 0.5,
            "maintenance_interval_s": 0.02,
        },
    )


async def test_another_instance_does_not_reload_back_a_replica_a_put_reloaded(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    old, new = str(tmp_path / "t-a"), str(tmp_path / "t-a-v2")
    for path in (old, new):
        write_adapter_folder(path, rank=8)
    async with contextlib.AsyncExitStack() as stack:
        r0, r1 = await stack.enter_async_context(paused_replicas(tmp_path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        cfg = _config([r0.url, r1.url], redis_server.url, f"t{uuid.uuid4().hex[:8]}:")
        gw_a = await stack.enter_async_context(running_gateway(cfg, port=0))
        gw_b = await stack.enter_async_context(running_gateway(cfg, port=0))
        status, body = await admin_call(
            http, "POST", gw_a.url + "/admin/adapters", {"name": "t-a", "path": old, "rank": 8}
        )
        assert status == 201 and body["loaded_on"], body
        for rep in (r0, r1):  # both replicas hold it (the other one loaded outside loragate)
            async with http.post(
                rep.url + "/v1/load_lora_adapter", json={"lora_name": "t-a", "lora_path": old}
            ) as resp:
                assert resp.status == 200 or "already" in (await resp.text()), resp.status
        assert await adapter_roots(http, [r0, r1], "t-a") == {old}

        async def b_knows_old() -> Any:
            await gw_b.gateway.pool.poll_once()
            return gw_b.gateway.pool.registered_adapters()

        held = await eventually(b_knows_old, lambda h: all("t-a" in h[r] for r in ("r0", "r1")))
        assert all("t-a" in held[r] for r in ("r0", "r1")), held
        await gw_a.gateway.pool.poll_once()

        # The PUT through A: r0 reloads at once, r1 (stopped) holds the PUT under way.
        assert r1.proc is not None
        r1.proc.send_signal(signal.SIGSTOP)
        put = asyncio.create_task(
            admin_call(http, "PUT", gw_a.url + "/admin/adapters/t-a", {"path": new, "rank": 8})
        )
        try:
            roots = await eventually(lambda: adapter_roots(http, [r0], "t-a"), lambda r: new in r)
            assert roots == {new}

            # B polls r0 with its catalog still on the old definition (the swap waits for r1).
            pool_b = gw_b.gateway.pool
            await pool_b.poll_once()
            await wait_until(
                lambda: not pool_b.stale_checking("r0", "t-a"), "B's check of r0", _BOUND_S
            )
            assert await adapter_roots(http, [r0], "t-a") == {new}  # before: back to old
            assert not put.done()
        finally:
            r1.proc.send_signal(signal.SIGCONT)
        status, body = await asyncio.wait_for(put, _BOUND_S)
        assert status == 200 and body["path"] == new, body
        assert sorted(body["reloaded_on"]) == ["r0", "r1"], body

        async def b_roots() -> set[str]:
            await pool_b.poll_once()
            return await adapter_roots(http, [r0, r1], "t-a")

        assert await eventually(b_roots, lambda r: r == {new}, timeout_s=_BOUND_S) == {new}
        await wait_until(
            lambda: gw_b.gateway.catalog.adapters["t-a"].path == new, "B's catalog", _BOUND_S
        )
