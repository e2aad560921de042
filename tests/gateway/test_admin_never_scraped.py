"""``GET /admin/replicas``: ``seconds_since_scrape`` is null for a replica never scraped (it
was the clock's reading, the machine's uptime, since its snapshot starts at time 0)."""

from __future__ import annotations

import aiohttp
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

AUTH = {"Authorization": "Bearer admin-s3cret"}


async def test_a_replica_never_scraped_shows_null(replicas: list[ScriptedReplica]) -> None:
    await replicas[1].runner.cleanup()  # down from the start
    cfg = gateway_config([r.url for r in replicas], admin={"token": "admin-s3cret"})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/admin/replicas", headers=AUTH) as resp:
            assert resp.status == 200
            by_id = {r["id"]: r for r in (await resp.json())["replicas"]}
        assert by_id["r1"]["healthy"] is False and by_id["r1"]["last_error"]
        assert by_id["r1"]["seconds_since_scrape"] is None
        assert by_id["r0"]["healthy"] is True
        assert 0.0 <= by_id["r0"]["seconds_since_scrape"] < 60.0
        # A replica that was scraped and then fails keeps the age of its last figures.
        await replicas[0].runner.cleanup()
        await gw.gateway.pool.poll_replicas(("r0",))
        async with http.get(gw.url + "/admin/replicas", headers=AUTH) as resp:
            by_id = {r["id"]: r for r in (await resp.json())["replicas"]}
        assert by_id["r0"]["healthy"] is False
        assert 0.0 <= by_id["r0"]["seconds_since_scrape"] < 60.0
