"""VllmClient against a real loopback server with vLLM 0.32's recorded admin behaviour."""

from __future__ import annotations

import aiohttp
import pytest

from loragate.backends.client import VllmClient, error_message, parse_models
from loragate.core.errors import AdapterLoadError, UpstreamConnectError, UpstreamProtocolError
from vllm_stub import StubVllm

# GET /v1/models after loads, recorded (shortened permission lists).
MODELS_JSON = {
    "object": "list",
    "data": [
        {"id": "tiny-llama", "object": "model", "root": "/m", "parent": None, "max_model_len": 512},
        {"id": "lora-0", "object": "model", "root": "/l/0", "parent": "tiny-llama"},
        {"id": "lora-1", "object": "model", "root": "/l/1", "parent": "tiny-llama"},
    ],
}


def test_parse_models_splits_base_and_adapters() -> None:
    models = parse_models(MODELS_JSON)
    assert models.base_models == ("tiny-llama",)
    assert models.adapters == frozenset({"lora-0", "lora-1"})
    with pytest.raises(UpstreamProtocolError):
        parse_models({"object": "list"})
    with pytest.raises(UpstreamProtocolError):
        parse_models({"data": [{"object": "model"}]})


def test_error_message_reads_openai_shape_or_text() -> None:
    body = b'{"error":{"message":"boom","type":"X","param":null,"code":400}}'
    assert error_message(body) == "boom"
    assert error_message(b"Success: plain") == "Success: plain"


async def test_admin_calls_follow_recorded_statuses(
    stub_vllm: StubVllm, session: aiohttp.ClientSession
) -> None:
    client = VllmClient(session, stub_vllm.url)
    assert await client.health()
    assert (await client.list_models()).adapters == frozenset()
    assert await client.load_adapter("lora-0", "/loras/lora-0") is True
    # Same name again: vLLM's 400 "already been loaded" means it is registered: not an error.
    assert await client.load_adapter("lora-0", "/loras/lora-0") is False
    assert (await client.list_models()).adapters == frozenset({"lora-0"})
    with pytest.raises(AdapterLoadError) as info:
        await client.load_adapter("nope", "/elsewhere/nope")
    assert info.value.status == 404 and "No adapter found" in info.value.message
    with pytest.raises(AdapterLoadError) as info:
        await client.load_adapter("tiny-llama", "/loras/x")
    assert info.value.status == 400 and "conflicts" in info.value.message
    assert await client.unload_adapter("lora-0") is True
    assert await client.unload_adapter("lora-0") is False
    m = await client.metrics()
    assert (m.num_running, m.num_waiting, m.num_deferred, m.max_loras) == (1, 3, 2, 3)
    assert m.running_adapters == ("a",)
    stub_vllm.health_status = 503
    assert not await client.health()


async def test_unreachable_replica_raises_connect_error(session: aiohttp.ClientSession) -> None:
    client = VllmClient(session, "http://127.0.0.1:9", poll_timeout_s=2.0)
    with pytest.raises(UpstreamConnectError):
        await client.health()
