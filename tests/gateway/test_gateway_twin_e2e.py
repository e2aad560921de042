"""End to end over loopback: the openai SDK -> the gateway -> 3 simulated vLLM 0.32 replicas
(``loragate.twin``), each a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import openai_client

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.gateway import running_gateway
from loragate.routing import default_registry
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"
N_ADAPTERS = 6


class Cluster:
    def __init__(self, stack: contextlib.AsyncExitStack, tmp: Path) -> None:
        self.stack = stack
        self.tmp = tmp
        self.replicas: list[RunningReplica] = []
        self.stops: list[contextlib.AsyncExitStack] = []

    def config(self, **sections: Any) -> GatewayConfig:
        doc: dict[str, Any] = {
            "base_model": BASE,
            "replicas": [{"id": f"r{i}", "url": r.url} for i, r in enumerate(self.replicas)],
            "adapters": [
                {"name": f"lora-{i}", "path": str(self.tmp / f"lora-{i}"), "rank": 8 + 8 * (i % 2)}
                for i in range(N_ADAPTERS)
            ],
            "routing": "least_loaded",
            "poller": {"interval_s": 0.2},
        }
        doc.update(sections)
        return config_from_mapping(doc)

    async def kill(self, index: int) -> None:
        await self.stops[index].aclose()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    for i in range(N_ADAPTERS):
        write_adapter_folder(str(tmp_path / f"lora-{i}"), rank=8 + 8 * (i % 2))
    async with contextlib.AsyncExitStack() as stack:
        c = Cluster(stack, tmp_path)
        for seed in range(3):
            own = contextlib.AsyncExitStack()
            stack.push_async_callback(own.aclose)
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=2, max_cpu_loras=4,
                max_lora_rank=16, seed=seed, time_scale=20.0,
            )  # fmt: skip
            c.replicas.append(await own.enter_async_context(run_replica(cfg, port=0)))
            c.stops.append(own)
        yield c


async def _registered(replica: RunningReplica) -> set[str]:
    async with aiohttp.ClientSession() as http, http.get(replica.url + "/v1/models") as resp:
        data = (await resp.json())["data"]
    return {m["id"] for m in data if m["parent"] is not None}


async def test_sdk_completions_and_chat_streaming_and_not(cluster: Cluster) -> None:
    async with running_gateway(cluster.config(), port=0) as gw, openai_client(gw.url) as client:
        done = await client.completions.create(
            model="lora-0", prompt="hello there", max_tokens=7, extra_body={"ignore_eos": True}
        )
        assert done.model == "lora-0" and done.usage is not None
        assert done.usage.completion_tokens == 7  # exact token counts pass through
        chat = await client.chat.completions.create(
            model="lora-1", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert chat.model == "lora-1" and chat.choices[0].message.role == "assistant"
        text_chunks, usage = [], None
        stream = await client.completions.create(
            model=BASE, prompt="abc", max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices:
                text_chunks.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        assert len(text_chunks) == 6 and usage is not None and usage.completion_tokens == 6
        deltas = []
        chat_stream = await client.chat.completions.create(
            model="lora-2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in chat_stream:
            deltas.append(chunk.choices[0].delta)
        assert deltas[0].role == "assistant"
        assert chunk.choices[0].finish_reason == "length"


async def test_routing_by_adapter_loads_each_adapter_where_it_is_routed(cluster: Cluster) -> None:
    cfg = cluster.config(routing="consistent_hash")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        placed: dict[str, set[str]] = {}
        for _ in range(3):
            for i in range(N_ADAPTERS):
                raw = await client.completions.with_raw_response.create(
                    model=f"lora-{i}", prompt="p", max_tokens=2
                )
                assert raw.parse().model == f"lora-{i}"
                placed.setdefault(f"lora-{i}", set()).add(raw.headers["x-loragate-replica"])
        assert all(len(rids) == 1 for rids in placed.values())  # sticky per adapter
        assert len({next(iter(r)) for r in placed.values()}) > 1  # and spread over replicas
        # On-demand loads happened exactly where each adapter was routed, once each.
        for idx, replica in enumerate(cluster.replicas):
            expected = {a for a, rids in placed.items() if f"r{idx}" in rids}
            assert await _registered(replica) == expected
        assert sum(gw.gateway.pool.adapter_loads().values()) == N_ADAPTERS


async def test_concurrent_first_requests_share_one_load(cluster: Cluster) -> None:
    cfg = cluster.config(replicas=[{"id": "r0", "url": cluster.replicas[0].url}])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        results = await asyncio.gather(
            *(
                client.completions.create(model="lora-3", prompt="p", max_tokens=2)
                for _ in range(16)
            )
        )
        assert {r.model for r in results} == {"lora-3"}
        assert gw.gateway.pool.adapter_loads() == {"r0": 1}
    assert await _registered(cluster.replicas[0]) == {"lora-3"}


async def test_unknown_and_unloadable_adapters(cluster: Cluster, tmp_path: Path) -> None:
    adapters = [
        {"name": "lora-0", "path": str(tmp_path / "lora-0")},
        {"name": "broken", "path": str(tmp_path / "no-such-folder")},
    ]
    cfg = cluster.config(adapters=adapters)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="lora-5", prompt="p")  # not configured
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="broken", prompt="p")
        assert info.value.status_code == 502
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "adapter_load_failed"
        assert "No adapter found" in body["message"]  # the replica's own words
        ok = await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        assert ok.model == "lora-0"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_adapter_one_replica_refuses_is_served_by_another(
    tmp_path: Path, stream: bool
) -> None:
    # A mixed fleet: r0 runs with --max-lora-rank 8 and refuses the rank-16 adapter (vLLM's
    # 400); r1 takes it. round_robin sends every other request to r0 first.
    write_adapter_folder(str(tmp_path / "big"), rank=16)
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for rank in (8, 16):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=2, max_lora_rank=rank,
                time_scale=20.0,
            )  # fmt: skip
            urls.append((await stack.enter_async_context(run_replica(cfg, port=0))).url)
        gw_cfg = config_from_mapping(
            {
                "base_model": BASE,
                "replicas": [{"id": f"r{i}", "url": u} for i, u in enumerate(urls)],
                "adapters": [{"name": "big", "path": str(tmp_path / "big"), "rank": 16}],
                "routing": "round_robin",
            }
        )
        gw = await stack.enter_async_context(running_gateway(gw_cfg, port=0))
        client = await stack.enter_async_context(openai_client(gw.url))
        for _ in range(4):
            raw = await client.completions.with_raw_response.create(
                model="big", prompt="p", max_tokens=2, stream=stream
            )
            assert raw.headers["x-loragate-replica"] == "r1"
            parsed: Any = raw.parse()
            chunks = [c async for c in parsed] if stream else [parsed]
            assert {c.model for c in chunks} == {"big"}
        # r0 refused once: remembered, it was not asked again (else once per request).
        assert gw.gateway.pool.refusals.counts == {("big", "r0"): 1}
        assert gw.gateway.pool.is_healthy("r0")  # it still serves everything else
        served = set()
        for _ in range(2):  # round_robin over both
            done = await client.completions.with_raw_response.create(
                model=BASE, prompt="p", max_tokens=2
            )
            served.add(done.headers["x-loragate-replica"])
        assert served == {"r0", "r1"}


@pytest.mark.parametrize("policy", sorted(default_registry().profiles))
async def test_every_builtin_policy_serves(cluster: Cluster, policy: str) -> None:
    cfg = cluster.config(routing=policy)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as c:
        results = await asyncio.gather(
            *(
                c.completions.create(model=f"lora-{i % 4}", prompt="p", max_tokens=2)
                for i in range(8)
            )
        )
        assert [r.model for r in results] == [f"lora-{i % 4}" for i in range(8)]


async def test_replica_killed_mid_run_is_dropped(cluster: Cluster) -> None:
    cfg = cluster.config(routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        ok = errors = 0

        async def one(i: int) -> None:
            nonlocal ok, errors
            try:
                if i % 3 == 0:
                    stream = await client.completions.create(
                        model=f"lora-{i % N_ADAPTERS}", prompt="p", max_tokens=8, stream=True
                    )
                    async for _ in stream:
                        pass
                else:
                    await client.completions.create(
                        model=f"lora-{i % N_ADAPTERS}", prompt="p", max_tokens=8
                    )
                ok += 1
            except openai.APIError:
                errors += 1  # only a stream cut off by the kill may fail

        async def traffic(start: int, n: int) -> None:
            await asyncio.gather(*(one(i) for i in range(start, start + n)))

        first = asyncio.create_task(traffic(0, 30))
        await asyncio.sleep(0.05)
        await cluster.kill(1)
        await first
        await traffic(30, 30)  # after the kill: everything must succeed
        assert ok + errors == 60 and errors <= 10
        assert not gw.gateway.pool.is_healthy("r1")
        assert {s.replica_id for s in gw.gateway.pool.healthy_snapshots()} == {"r0", "r2"}
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as resp:
            assert (await resp.json())["status"] == "degraded"
