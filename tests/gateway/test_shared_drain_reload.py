"""A drained replica leaving one instance's config, with two gateway instances on one real
redis-server in front of three simulated replicas (the twin), each instance reloading its own
config file as an operator rolls a config change out: the drain stays in force for the
instance that has not reloaded yet (it still routes by its old config), is shown and can be
ended from an instance whose config no longer has the replica, and a replica added back under
a drained id comes back drained."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml
from shared_cluster import (
    BASE,
    TOKEN,
    admin_call,
    eventually,
    get_json,
    routed_to,
    sdk,
    twin_replicas,
)

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.gateway.runner import RunningGateway
from loragate.twin.server import RunningReplica
from redis_fixture import RedisServer


def _doc(replicas: list[RunningReplica], ids: list[str], redis_url: str, prefix: str) -> Any:
    return {
        "base_model": BASE,
        "replicas": [
            {"id": f"r{i}", "url": r.url} for i, r in enumerate(replicas) if f"r{i}" in ids
        ],
        "routing": "round_robin",
        "poller": {"interval_s": 0.2},
        "admin": {"token": TOKEN},
        "state": {
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": prefix,
            "refresh_s": 0.05,
            "maintenance_interval_s": 0.02,
        },
    }


async def _routed(client: openai.AsyncOpenAI, n: int) -> set[str]:
    return {await routed_to(client) for _ in range(n)}


async def _reload(http: aiohttp.ClientSession, gw: RunningGateway) -> Any:
    status, body = await admin_call(http, "POST", gw.url + "/admin/reload")
    assert status == 200, body
    return body


async def _draining(http: aiohttp.ClientSession, gw: RunningGateway, rid: str) -> bool:
    return bool((await get_json(http, f"{gw.url}/admin/replicas/{rid}"))["draining"])


async def test_a_replica_one_instance_removes_stays_drained_for_every_instance(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"drain-{uuid.uuid4().hex[:8]}:"
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 3, 0))
        files = {name: tmp_path / f"{name}.yaml" for name in ("a", "b")}

        def write(name: str, ids: list[str]) -> None:
            doc = _doc(replicas, ids, redis_server.url, prefix)
            files[name].write_text(yaml.safe_dump(doc), encoding="utf-8")

        gws: dict[str, RunningGateway] = {}
        for name in ("a", "b"):
            write(name, ["r0", "r1", "r2"])
            cfg = config_from_mapping(yaml.safe_load(files[name].read_text()))
            gws[name] = await stack.enter_async_context(
                running_gateway(cfg, port=0, config_path=files[name])
            )
        gw_a, gw_b = gws["a"], gws["b"]
        client_a = await stack.enter_async_context(sdk(gw_a.url))
        client_b = await stack.enter_async_context(sdk(gw_b.url))
        http = await stack.enter_async_context(aiohttp.ClientSession())

        # The operator drains r0, then rolls out a config without it: A reloads first.
        status, _ = await admin_call(http, "POST", gw_a.url + "/admin/replicas/r0/drain")
        assert status == 200
        assert await eventually(lambda: _draining(http, gw_b, "r0"), bool)
        write("a", ["r1", "r2"])
        assert (await _reload(http, gw_a))["replicas_removed"] == ["r0"]
        # Whatever A writes in the background is written; then a drain of r2 on A, which B
        # sees after anything A wrote before it.
        shared_a = gw_a.gateway.shared
        assert await eventually(lambda: _async(shared_a._pool_writer is None), bool)
        status, _ = await admin_call(http, "POST", gw_a.url + "/admin/replicas/r2/drain")
        assert status == 200
        assert await eventually(lambda: _draining(http, gw_b, "r2"), bool)

        # B has not reloaded: r0 is still in its config, and still drained.
        assert await _draining(http, gw_b, "r0") is True
        assert await _routed(client_b, 4) == {"r1"}
        status, _ = await admin_call(http, "DELETE", gw_a.url + "/admin/replicas/r2/drain")
        assert status == 200

        # A shows the drain it no longer routes by, and answers for r0 from the shared state.
        listing = await get_json(http, gw_a.url + "/admin/replicas")
        assert [r["id"] for r in listing["replicas"]] == ["r1", "r2"]
        assert [r["id"] for r in listing["drained_not_configured"]] == ["r0"]
        status, body = await admin_call(http, "GET", gw_a.url + "/admin/replicas/r0")
        assert status == 200, body
        assert (body["configured_here"], body["draining"], body["url"]) == (
            False,
            True,
            replicas[0].url,
        )
        assert isinstance(body["draining_for_s"], float)
        assert (body["in_flight"], body["in_flight_here"]) == (0, 0)

        # B reloads too; A gets r0 back (the operator changed their mind): still drained.
        write("b", ["r1", "r2"])
        assert (await _reload(http, gw_b))["replicas_removed"] == ["r0"]
        write("a", ["r0", "r1", "r2"])
        assert (await _reload(http, gw_a))["replicas_added"] == ["r0"]
        assert await _draining(http, gw_a, "r0") is True
        assert await _routed(client_a, 4) == {"r1", "r2"}

        # Ended on B, whose config no longer has r0: A routes there again.
        status, body = await admin_call(http, "DELETE", gw_b.url + "/admin/replicas/r0/drain")
        assert status == 200, body
        assert (body["configured_here"], body["draining"]) == (False, False)
        assert not await eventually(lambda: _draining(http, gw_a, "r0"), lambda d: not d)
        assert await _routed(client_a, 3) == {"r0", "r1", "r2"}
        # Unknown everywhere is still a 404.
        status, body = await admin_call(http, "DELETE", gw_b.url + "/admin/replicas/r9/drain")
        assert (status, body["error"]["param"]) == (404, "id"), body


async def _async(value: bool) -> bool:
    return value
