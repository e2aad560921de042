"""Helpers for gateway tests with a real redis-server: simulated replicas (the twin, profile
``fast``) on loopback, and gateway configs that share state through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import RunningReplica, run_replica

BASE = "tiny-llama"
TOKEN = "shared-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_LORAS = 2
MAX_CPU_LORAS = 4

T = TypeVar("T")


@contextlib.asynccontextmanager
async def twin_replicas(tmp: Path, n: int, n_adapters: int) -> AsyncIterator[list[RunningReplica]]:
    for i in range(n_adapters):
        write_adapter_folder(str(tmp / f"lora-{i}"), rank=8)
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for seed in range(n):
            cfg = ReplicaConfig(
                served_model_name=BASE, enable_lora=True, max_loras=MAX_LORAS,
                max_cpu_loras=MAX_CPU_LORAS, max_lora_rank=16, profile="fast", seed=seed,
            )  # fmt: skip
            out.append(await stack.enter_async_context(run_replica(cfg, port=0)))
        yield out


def shared_config(
    running: list[RunningReplica], tmp: Path, redis_url: str, n_adapters: int, **sections: Any
) -> GatewayConfig:
    """Replica ids r0, r1, ... with the twins' settings; ``sections`` override top-level keys."""
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [
            {
                "id": f"r{i}",
                "url": r.url,
                "settings": {"max_loras": MAX_LORAS, "max_cpu_loras": MAX_CPU_LORAS},
            }
            for i, r in enumerate(running)
        ],
        "adapters": [
            {"name": f"lora-{i}", "path": str(tmp / f"lora-{i}")} for i in range(n_adapters)
        ],
        "routing": "least_loaded",
        "poller": {"interval_s": 0.2},
        "admin": {"token": TOKEN},
        "state": {
            "backend": "redis",
            "redis_url": redis_url,
            "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
            "refresh_s": 0.05,
            "op_timeout_s": 0.5,
            "maintenance_interval_s": 0.02,
        },
    }
    doc.update(sections)
    return config_from_mapping(doc)


@contextlib.asynccontextmanager
async def sdk(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """An ``openai`` client for the gateway at ``url``, closed on exit (``async with`` only, as
    ``gateway_harness.openai_client``)."""
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, timeout=30.0
    ) as client:
        yield client


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status in (200, 503), resp.status
        return await resp.json()


async def admin_call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, timeout_s: float = 30
) -> tuple[int, Any]:
    """An admin API call with the token; ``timeout_s`` bounds it (a client that leaves)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with http.request(method, url, json=body, headers=AUTH, timeout=timeout) as resp:
        return resp.status, await resp.json()


async def routed_to(client: openai.AsyncOpenAI) -> str:
    """The replica the gateway sent one small base-model completion to."""
    raw = await client.completions.with_raw_response.create(model=BASE, prompt="x", max_tokens=2)
    return raw.headers["x-loragate-replica"]


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout_s: float = 10.0
) -> T:
    """Poll ``probe`` until ``done(result)`` (bounded); returns the last result either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    result = await probe()
    while not done(result) and loop.time() < deadline:
        await asyncio.sleep(0.05)
        result = await probe()
    return result
