"""A request for an adapter registered on another gateway instance a moment ago is served,
not a 404 until this instance's next refresh: on a catalog miss the gateway reads the shared
store once (one HGET) before answering 404."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import openai
import pytest
from shared_cluster import sdk, shared_config, twin_replicas

from loragate.core.types import AdapterSpec
from loragate.gateway import running_gateway
from loragate.state import KeySpace, RedisStore
from redis_fixture import RedisServer

STALE_REFRESH_S = 3600.0  # this instance never refreshes its view during the test


async def test_a_request_for_an_adapter_registered_elsewhere_is_served_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = await stack.enter_async_context(twin_replicas(tmp_path, 1, 2))
        cfg = shared_config(replicas, tmp_path, redis_server.url, 2)
        cfg = dataclasses.replace(
            cfg, state=dataclasses.replace(cfg.state, refresh_s=STALE_REFRESH_S)
        )
        gw = await stack.enter_async_context(running_gateway(cfg, port=0))
        client = await stack.enter_async_context(sdk(gw.url))
        other = RedisStore.from_url(redis_server.url, keys=KeySpace(prefix=cfg.state.key_prefix))
        stack.push_async_callback(other.close)
        assert await other.put_adapter(
            AdapterSpec(name="late", path=str(tmp_path / "lora-1"), rank=8)
        )
        out = await client.completions.create(model="late", prompt="x", max_tokens=2)
        assert out.model == "late"
        # An unknown name is still a 404 (after the one store read).
        with pytest.raises(openai.NotFoundError) as err:
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
        assert err.value.status_code == 404
