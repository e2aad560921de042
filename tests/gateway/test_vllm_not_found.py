"""As a drop-in for vLLM 0.32: an unknown model (or one the tenant may not use) gets vLLM's
404 word for word on the OpenAI endpoints (recorded in
../shared/design/vllm-0.32/transcript_basic.md), which the openai SDK raises as its
``NotFoundError`` as before; ``GET /ping`` answers as ``/health`` (vLLM lists both)."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import running_gateway

TENANTS = [{"name": "acme", "api_keys": ["sk-acme"]}, {"name": "beta", "api_keys": ["sk-beta"]}]


def _vllm_404(model: str) -> dict[str, object]:
    return {
        "message": f"The model `{model}` does not exist. Valid aliases: {BASE}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["no-such-adapter", "beta-only"])
async def test_an_unknown_model_gets_vllms_404_and_the_sdk_raises_not_found(
    replicas: list[ScriptedReplica], model: str, stream: bool
) -> None:
    adapters = [{"name": "beta-only", "path": "/loras/b", "tenants": ["beta"]}]
    cfg = gateway_config([r.url for r in replicas], tenants=TENANTS, adapters=adapters)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url, "sk-acme") as client:
        with pytest.raises(openai.NotFoundError) as completion:
            await client.completions.create(model=model, prompt="p", max_tokens=1, stream=stream)
        with pytest.raises(openai.NotFoundError) as chat:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=stream
            )
    for raised in (completion.value, chat.value):
        assert raised.status_code == 404
        assert raised.body == _vllm_404(model)
        assert raised.response.headers["X-Request-Id"]
    assert not [b for r in replicas for b in r.requests]


async def test_ping_answers_as_health(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/health") as resp:
            health = resp.status, (await resp.json())["status"]
        async with http.get(gw.url + "/ping") as resp:
            assert (resp.status, (await resp.json())["status"]) == health == (200, "ok")
            assert resp.headers["X-Request-Id"]
