"""Where ``POST /admin/adapters`` loads a new adapter (``gateway.load_placement``): not the
first healthy replica in config order every time, but the one where the load evicts least
(vLLM 0.32 activates what it loads: a full replica loses a GPU slot, a full CPU cache an
adapter), with the fewest requests in flight, the routing policy's choice when it has one,
and a burst of registrations spread over the replicas. Simulated replicas (the twin's
server, as ``loragate replica`` runs it) and scripted vLLM stubs on loopback sockets; the
admin calls over aiohttp, requests through the openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving_replicas,
    wait_until,
)
from shared_cluster import AUTH as SHARED_AUTH
from shared_cluster import eventually, get_json, shared_config, twin_replicas

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.gateway import load_config, running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica
from redis_fixture import RedisServer

TOKEN = "placement-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _admin(
    url: str, method: str, path: str, body: Any = None, auth: dict[str, str] = AUTH
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url + path, headers=auth, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@contextlib.asynccontextmanager
async def _twins(slots: list[tuple[int, int]]) -> AsyncIterator[list[RunningReplica]]:
    """Simulated replicas with (max_loras, max_cpu_loras) each."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for seed, (gpu, cpu) in enumerate(slots):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=gpu, max_cpu_loras=cpu,
                max_lora_rank=16, profile="fast", seed=seed,
            )  # fmt: skip
            out.append(await stack.enter_async_context(run_replica(cfg, port=0)))
        yield out


def _config(
    replicas: list[RunningReplica], slots: list[tuple[int, int]], tmp: Path, **sections: Any
) -> GatewayConfig:
    return config_from_mapping({**_document(replicas, slots, tmp), **sections})


def _document(
    replicas: list[RunningReplica], slots: list[tuple[int, int]], tmp: Path
) -> dict[str, Any]:
    return {
        "base_model": BASE,
        "replicas": [
            {"id": f"r{i}", "url": r.url, "settings": {"max_loras": g, "max_cpu_loras": c}}
            for i, (r, (g, c)) in enumerate(zip(replicas, slots, strict=True))
        ],
        "adapters": [{"name": f"hot-{i}", "path": str(tmp / f"hot-{i}")} for i in range(2)],
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }


def _folders(tmp: Path, names: list[str]) -> None:
    for name in names:
        write_adapter_folder(str(tmp / name), rank=8)


async def test_a_full_replica_is_passed_over_for_an_idle_one_with_free_slots(
    tmp_path: Path,
) -> None:
    # r0: 2 GPU slots, a CPU cache of 2, both taken by hot adapters; r1: 4 free slots.
    slots = [(2, 2), (4, 8)]
    _folders(tmp_path, ["hot-0", "hot-1", "fresh"])
    async with (
        _twins(slots) as twins,
        running_gateway(_config(twins, slots, tmp_path), port=0) as gw,
    ):
        r0, r1 = (t.state.engine for t in twins)
        status, body = await _admin(gw.url, "POST", "/admin/replicas/r1/drain")
        assert status == 200, body
        async with openai_client(gw.url) as client:
            for name in ("hot-0", "hot-1"):
                await client.completions.create(model=name, prompt="x", max_tokens=1)
        await _admin(gw.url, "DELETE", "/admin/replicas/r1/drain")
        assert r0.gpu_adapters() == ["hot-0", "hot-1"]

        status, body = await _admin(
            gw.url, "POST", "/admin/adapters", {"name": "fresh", "path": str(tmp_path / "fresh")}
        )
        assert status == 201, body
        # Before: loaded on r0 (first in config order), evicting hot-0 from both its tiers.
        assert (body["loaded_on"], body["untried"]) == (["r1"], False), body
        assert (body["refused_by"], body["not_tried"]) == ({}, {})
        assert r0.gpu_adapters() == ["hot-0", "hot-1"]
        assert r0.cpu_adapters() == ["hot-0", "hot-1"]
        assert r1.gpu_adapters() == ["fresh"]
        _, reps = await _admin(gw.url, "GET", "/admin/replicas")
        shadow = {r["id"]: r["residency"]["gpu"] for r in reps["replicas"]}
        assert shadow == {"r0": ["hot-0", "hot-1"], "r1": ["fresh"]}


async def test_a_burst_of_registrations_is_spread_without_evictions(tmp_path: Path) -> None:
    # Two replicas with 2 GPU slots and a CPU cache of 4 each: room for 8 adapters in all.
    slots = [(2, 4), (2, 4)]
    names = [f"new-{i}" for i in range(8)]
    _folders(tmp_path, names)
    async with (
        _twins(slots) as twins,
        running_gateway(_config(twins, slots, tmp_path), port=0) as gw,
    ):
        placed = []
        for name in names:
            status, body = await _admin(
                gw.url, "POST", "/admin/adapters", {"name": name, "path": str(tmp_path / name)}
            )
            assert status == 201, body
            placed.append(body["loaded_on"][0])
        # Before: all 8 on r0, whose CPU cache of 4 dropped the first 4 again.
        assert Counter(placed) == {"r0": 4, "r1": 4}, placed
        engines = [t.state.engine for t in twins]
        held = [set(e.cpu_adapters()) for e in engines]
        assert held[0] | held[1] == set(names) and not held[0] & held[1]  # none dropped
        # The free GPU slots went first: each replica took two before either pushed one out.
        assert set(placed[:4]) == {"r0", "r1"} and Counter(placed[:4]) == {"r0": 2, "r1": 2}


async def test_concurrent_registrations_do_not_all_land_on_one_replica(tmp_path: Path) -> None:
    slots = [(2, 4), (2, 4), (2, 4)]
    names = [f"par-{i}" for i in range(6)]
    _folders(tmp_path, names)
    async with (
        _twins(slots) as twins,
        running_gateway(_config(twins, slots, tmp_path), port=0) as gw,
    ):
        answers = await asyncio.gather(
            *(
                _admin(gw.url, "POST", "/admin/adapters", {"name": n, "path": str(tmp_path / n)})
                for n in names
            )
        )
        assert all(status == 201 for status, _ in answers), answers
        placed = Counter(body["loaded_on"][0] for _, body in answers)
        # Before: all 6 on r0 (3 of them pushed out of its 2 slots at once).
        assert placed == {"r0": 2, "r1": 2, "r2": 2}, placed
        for twin in twins:
            assert len(twin.state.engine.gpu_adapters()) == 2


async def test_the_replica_with_fewer_requests_in_flight_gets_the_load() -> None:
    async with contextlib.AsyncExitStack() as stack:
        r0, r1 = await stack.enter_async_context(serving_replicas(ScriptedReplica))
        r0.answer_gate = asyncio.Event()  # r0 holds its answers: its requests stay in flight
        gw = await stack.enter_async_context(
            running_gateway(gateway_config([r0.url, r1.url], admin={"token": TOKEN}), port=0)
        )
        client = await stack.enter_async_context(openai_client(gw.url))
        # round_robin (the default) sends the first base-model request to r0: no adapter, so
        # no slot taken there, only a request in flight.
        held = asyncio.create_task(client.completions.create(model=BASE, prompt="x"))
        await wait_until(lambda: len(r0.requests) == 1, "the request to reach r0")
        status, body = await _admin(
            gw.url, "POST", "/admin/adapters", {"name": "extra", "path": "/loras/extra"}
        )
        assert status == 201, body
        # Before: r0, first in config order, busy or not.
        assert body["loaded_on"] == ["r1"], body
        assert "extra" in r1.adapters and "extra" not in r0.adapters
        r0.answer_gate.set()
        done = await asyncio.wait_for(held, timeout=30)
        assert done.choices[0].text == "hi from r0"


async def test_the_load_goes_where_consistent_hash_routes_the_adapter(tmp_path: Path) -> None:
    slots = [(4, 8), (4, 8)]
    names = [f"ring-{i}" for i in range(4)]
    _folders(tmp_path, names)
    async with (
        _twins(slots) as twins,
        running_gateway(_config(twins, slots, tmp_path, routing="consistent_hash"), port=0) as gw,
    ):
        placed: dict[str, str] = {}
        for name in names:
            status, body = await _admin(
                gw.url, "POST", "/admin/adapters", {"name": name, "path": str(tmp_path / name)}
            )
            assert status == 201, body
            placed[name] = body["loaded_on"][0]
        served: dict[str, str] = {}
        async with openai_client(gw.url) as client:
            for name in names:
                raw = await client.completions.with_raw_response.create(
                    model=name, prompt="x", max_tokens=1
                )
                served[name] = raw.headers["X-Loragate-Replica"]
        # Before: all on r0, while the ring sends some of them to r1 (a second load there).
        assert placed == served, (placed, served)
        assert set(served.values()) == {"r0", "r1"}  # the ring splits these names
        loads = sum(t.state.engine.loads_from_disk for t in twins)
        assert loads == len(names)  # one load each: the registration's


async def test_two_gateways_on_one_redis_spread_their_registrations(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Each instance sees the other's loads in the shared shadow residency: registrations made
    # on both, one after the other, fill the replicas' free slots evenly.
    names = [f"dup-{i}" for i in range(4)]
    _folders(tmp_path, names)
    async with contextlib.AsyncExitStack() as stack:
        twins = await stack.enter_async_context(twin_replicas(tmp_path, 2, 0))
        cfg = shared_config(twins, tmp_path, redis_server.url, 0)
        gws = [await stack.enter_async_context(running_gateway(cfg, port=0)) for _ in range(2)]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        placed = []
        for i, name in enumerate(names):
            gw, other = gws[i % 2], gws[1 - i % 2]
            status, body = await _admin(
                gw.url,
                "POST",
                "/admin/adapters",
                {"name": name, "path": str(tmp_path / name)},
                auth=SHARED_AUTH,
            )
            assert status == 201, body
            rid = body["loaded_on"][0]
            placed.append(rid)

            async def gpu_seen(url: str = other.url, at: str = rid) -> list[str]:
                reps = (await get_json(http, url + "/admin/replicas"))["replicas"]
                return next(r["residency"]["gpu"] for r in reps if r["id"] == at)

            seen = await eventually(gpu_seen, lambda gpu, n=name: n in gpu)
            assert name in seen  # the other instance's view holds the load before its turn
        # Before: all 4 on r0 (2 GPU slots), each registration past the second pushing one
        # of the others out of its slots.
        assert Counter(placed) == {"r0": 2, "r1": 2}, placed
        assert sorted(len(t.state.engine.gpu_adapters()) for t in twins) == [2, 2]


async def test_the_placement_follows_a_reloaded_routing_policy(tmp_path: Path) -> None:
    # Started with round_robin (no preference), reloaded to consistent_hash: the loads then go
    # where the ring sends each adapter's requests.
    slots = [(4, 8), (4, 8)]
    names = [f"ring-{i}" for i in range(6)]
    _folders(tmp_path, names)
    async with _twins(slots) as twins:
        doc = _document(twins, slots, tmp_path)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(doc))
        async with running_gateway(load_config(path), port=0, config_path=path) as gw:
            first = {"name": names[4], "path": str(tmp_path / names[4])}
            status, body = await _admin(gw.url, "POST", "/admin/adapters", first)
            assert status == 201 and body["loaded_on"] == ["r0"], body  # no preference
            path.write_text(yaml.safe_dump({**doc, "routing": "consistent_hash"}))
            status, body = await _admin(gw.url, "POST", "/admin/reload")
            assert status == 200 and body["policy"] == "consistent_hash", body
            placed: dict[str, str] = {}
            for name in names[:4]:
                status, body = await _admin(
                    gw.url, "POST", "/admin/adapters", {"name": name, "path": str(tmp_path / name)}
                )
                assert status == 201, body
                placed[name] = body["loaded_on"][0]
            served: dict[str, str] = {}
            async with openai_client(gw.url) as client:
                for name in placed:
                    raw = await client.completions.with_raw_response.create(
                        model=name, prompt="x", max_tokens=1
                    )
                    served[name] = raw.headers["X-Loragate-Replica"]
            assert placed == served, (placed, served)
