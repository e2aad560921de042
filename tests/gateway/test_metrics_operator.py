"""What an operator of an adapter-aware balancer reads in ``/metrics`` without the admin token,
scraped over loopback and parsed with prometheus_client's own parser: where routing found each
adapter on the replica it chose (GPU slot, CPU cache, registered only, not registered: a load),
how long adapter loads took and how long requests waited for them, the shadow residency's
occupancy and each replica's queue and KV usage from its last poll, poll failures by reason,
and how many gateway instances share the state store. And a 503 ``no_replica_available`` leaves
a rate-limited WARNING naming each replica's state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    picky_replicas,
    serving,
)
from metric_counts import Samples, scrape

from loragate.core.clock import VirtualClock
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica
from redis_fixture import RedisServer
from vllm_stub import StubVllm


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _by(samples: Samples, name: str, label: str, **fixed: str) -> dict[str, float]:
    """``name``'s samples that carry ``fixed``, by the value of ``label``."""
    out = {}
    for (got, labels), value in samples.items():
        d = dict(labels)
        if got == name and all(d.get(k) == v for k, v in fixed.items()) and label in d:
            out[d[label]] = value
    return out


@contextlib.asynccontextmanager
async def _twin(*, max_loras: int, max_cpu_loras: int) -> AsyncIterator[RunningReplica]:
    """A simulated vLLM 0.32 replica (``loragate replica``'s server) on loopback."""
    cfg = ReplicaConfig(
        served_model_name=BASE, enable_lora=True, max_loras=max_loras,
        max_cpu_loras=max_cpu_loras, max_lora_rank=16, time_scale=50.0,
    )  # fmt: skip
    async with run_replica(cfg, port=0) as replica:
        yield replica


def _adapters(tmp: Path, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        write_adapter_folder(str(tmp / f"lora-{i}"), rank=8)
        out.append({"name": f"lora-{i}", "path": str(tmp / f"lora-{i}"), "rank": 8})
    return out


# -- 1. residency at the routing decision, load durations and waits ---------------------------


async def test_residency_at_each_routing_decision_and_the_loads_it_caused(tmp_path: Path) -> None:
    async with _twin(max_loras=1, max_cpu_loras=2) as replica:
        cfg = gateway_config(
            [replica.url],
            replicas=[
                {"id": "r0", "url": replica.url, "settings": {"max_loras": 1, "max_cpu_loras": 2}}
            ],
            adapters=_adapters(tmp_path, 3),
        )
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            before = await scrape(gw.url)
            # One GPU slot, a CPU cache of two. Where each adapter is at its request:
            #   lora-0 unregistered (load) -> gpu [0]       cpu [0]
            #   lora-0 gpu                 -> gpu [0]       cpu [0]
            #   lora-1 unregistered (load) -> gpu [1]       cpu [0, 1]
            #   lora-0 cpu                 -> gpu [0]       cpu [1, 0]
            #   lora-2 unregistered (load) -> gpu [2]       cpu [0, 2]   (lora-1 evicted)
            #   lora-1 registered          -> gpu [1]       cpu [2, 1]
            #   base model: not an adapter, not counted
            for model in ("lora-0", "lora-0", "lora-1", "lora-0", "lora-2", "lora-1", BASE):
                done = await client.completions.create(model=model, prompt="p", max_tokens=2)
                assert done.model == model
            after = await scrape(gw.url)
    # Shown from 0 before any traffic (increase() sees the first of each).
    assert _by(before, "loragate_routing_residency_total", "residency", replica="r0") == {
        "gpu": 0, "cpu": 0, "registered": 0, "unregistered": 0,
    }  # fmt: skip
    assert _by(after, "loragate_routing_residency_total", "residency", replica="r0") == {
        "gpu": 1, "cpu": 1, "registered": 1, "unregistered": 3,
    }  # fmt: skip
    # Each load: timed by result; each request that waited for one: its wait.
    assert _get(after, "loragate_adapter_loads_total", replica="r0") == 3
    ok = {"replica": "r0", "result": "ok"}
    assert _get(after, "loragate_adapter_load_duration_seconds_count", **ok) == 3
    assert _get(after, "loragate_adapter_load_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert (_get(after, "loragate_adapter_load_duration_seconds_sum", **ok) or 0) > 0
    assert _get(after, "loragate_adapter_load_wait_seconds_count", replica="r0") == 3
    wait_s = _get(after, "loragate_adapter_load_wait_seconds_sum", replica="r0") or 0.0
    assert wait_s > 0
    # The shadow residency at the end, against the replica's capacity.
    assert _by(after, "loragate_replica_adapters", "tier", replica="r0") == {
        "gpu": 1, "cpu": 2, "registered": 3,
    }  # fmt: skip
    assert _by(after, "loragate_replica_adapter_slots", "tier", replica="r0") == {
        "gpu": 1, "cpu": 2,
    }  # fmt: skip


async def test_a_refused_load_and_its_retry_count_each_decision_and_each_load() -> None:
    async with picky_replicas() as picky:
        picky[0].refuse = {"lora-0"}
        cfg = gateway_config([r.url for r in picky], routing="round_robin")
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            done = await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
            after = await scrape(gw.url)
    residency = "loragate_routing_residency_total"
    assert _get(after, residency, replica="r0", residency="unregistered") == 1
    assert _get(after, residency, replica="r1", residency="unregistered") == 1
    duration = "loragate_adapter_load_duration_seconds_count"
    assert _get(after, duration, replica="r0", result="refused") == 1
    assert _get(after, duration, replica="r1", result="ok") == 1
    assert _get(after, duration, replica="r0", result="ok") is None
    assert _get(after, "loragate_adapter_load_wait_seconds_count", replica="r0") == 1
    assert _get(after, "loragate_adapter_load_wait_seconds_count", replica="r1") == 1


# -- 2. what routing sees of each replica ----------------------------------------------------


async def test_each_replicas_queue_and_kv_usage_from_its_last_poll() -> None:
    stub = StubVllm(BASE)  # vLLM's /metrics: 1 running, 3 waiting (2 deferred), KV 0.5
    async with serving(stub.app) as (url, _):
        cfg = gateway_config([url])
        async with running_gateway(cfg, port=0) as gw:
            first = await scrape(gw.url)
            stub.metrics_text = stub.metrics_text.replace(
                'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 1.0',
                'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 7.0',
            )
            await gw.gateway.pool.poll_once()
            second = await scrape(gw.url)
    assert _by(first, "loragate_replica_requests", "state", replica="r0") == {
        "running": 1, "waiting": 3, "deferred": 2,
    }  # fmt: skip
    assert _get(first, "loragate_replica_kv_cache_usage_ratio", replica="r0") == 0.5
    assert _get(second, "loragate_replica_requests", replica="r0", state="running") == 7
    # No settings in the config: the GPU slots come from vllm:lora_requests_info's max_lora.
    assert _get(first, "loragate_replica_adapter_slots", replica="r0", tier="gpu") == 3
    # The embedded store: this instance alone.
    assert _get(first, "loragate_gateway_instances") == 1


# -- 3. poll failures ------------------------------------------------------------------------


class _HangingHealth(StubVllm):
    """Never answers ``GET /health`` (a hung replica)."""

    async def _health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return await super()._health(request)


async def test_poll_failures_are_counted_by_replica_and_reason() -> None:
    sick, wrong, hung = StubVllm(BASE), StubVllm("other-model"), _HangingHealth(BASE)
    gone = StubVllm(BASE)
    sick.health_status = 503  # vLLM's /health while its engine is dead or stopping
    async with contextlib.AsyncExitStack() as stack:
        urls = [(await stack.enter_async_context(serving(s.app)))[0] for s in (sick, wrong, hung)]
        gone_url, gone_runner = await stack.enter_async_context(serving(gone.app))
        await gone_runner.cleanup()  # nothing listens there any more
        cfg = gateway_config([*urls, gone_url], poller={"interval_s": 3600, "timeout_s": 0.2})
        async with running_gateway(cfg, port=0) as gw:
            await gw.gateway.pool.poll_once()  # the start's poll, and this one
            samples = await scrape(gw.url)
    failures = "loragate_replica_poll_failures_total"
    found = {
        rid: {k: v for k, v in _by(samples, failures, "reason", replica=rid).items() if v}
        for rid in ("r0", "r1", "r2", "r3")
    }
    assert found == {
        "r0": {"bad_response": 2},
        "r1": {"wrong_model": 2},
        "r2": {"timeout": 2},
        "r3": {"connect": 2},
    }
    # Every reason is shown from 0 for every replica.
    assert set(_by(samples, failures, "reason", replica="r0")) == {
        "connect", "timeout", "bad_response", "wrong_model",
    }  # fmt: skip


# -- 4. instances sharing the state store ----------------------------------------------------


async def test_gateway_instances_counts_those_sharing_redis(
    replicas: list[ScriptedReplica], redis_server: RedisServer
) -> None:
    state = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
        "refresh_s": 0.05,
        "maintenance_interval_s": 0.02,
    }
    cfg = gateway_config([replicas[0].url], state=state)
    async with running_gateway(cfg, port=0) as a, running_gateway(cfg, port=0) as b:
        seen: dict[str, float | None] = {}

        async def both_see_two() -> bool:
            for name, gw in (("a", a), ("b", b)):
                seen[name] = _get(await scrape(gw.url), "loragate_gateway_instances")
            return seen == {"a": 2, "b": 2}

        for _ in range(200):  # a hang guard (the refreshes run every 50 ms), not a timing check
            if await both_see_two():
                break
            await asyncio.sleep(0.05)
        assert seen == {"a": 2, "b": 2}


# -- 5. the 503 no_replica_available in the log ----------------------------------------------


def _outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("no replica available")
    ]


async def test_no_replica_available_leaves_one_warning_a_minute_naming_the_replicas(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    await replicas[1].runner.cleanup()  # r1 never answers
    cfg = gateway_config([r.url for r in replicas], admin={"token": "adm"})
    clock = VirtualClock(1000.0)
    caplog.set_level(logging.WARNING, logger="loragate.gateway")
    async with running_gateway(cfg, port=0, clock=clock) as gw, openai_client(gw.url) as client:
        async with aiohttp.ClientSession() as http:
            drain = gw.url + "/admin/replicas/r0/drain"
            async with http.post(drain, headers={"Authorization": "Bearer adm"}) as resp:
                assert resp.status == 200
        for model in ("lora-0", BASE, "lora-1"):
            with pytest.raises(openai.InternalServerError) as info:
                await client.completions.create(model=model, prompt="p", max_tokens=1)
            assert info.value.status_code == 503
            assert info.value.code == "no_replica_available"
        lines = _outage_lines(caplog)
        assert len(lines) == 1, lines  # the two others fell within the minute
        line = lines[0]
        assert "POST /v1/completions for model lora-0" in line
        assert "503 no_replica_available" in line
        assert "r0=draining" in line
        assert "r1=unhealthy (" in line and "connect" in line.lower()
        assert "more since" not in line
        clock.advance_by(61.0)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="lora-0", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        lines = _outage_lines(caplog)
        assert len(lines) == 2, lines
        assert "POST /v1/chat/completions for model lora-0" in lines[1]
        assert "2 more since the last such line" in lines[1]
        # The gateway keeps serving: its /metrics counted every 503.
        samples = await scrape(gw.url)
    assert _by(samples, "loragate_requests_total", "adapter", status="503") == {
        "lora-0": 2, "": 1, "lora-1": 1,
    }  # fmt: skip
