"""The loragate gateway in front of a REAL vLLM CPU replica, driven by the official openai SDK:
the gateway loads the adapter on the replica on first use and proxies plain and streaming
completions and chat."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from vllm_e2e import BASE

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from vllm_cpu.replica import Replica

pytestmark = pytest.mark.vllm


def _sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120.0)


async def _registered(http: aiohttp.ClientSession, rep: Replica) -> set[str]:
    async with http.get(f"{rep.base_url}/v1/models") as r:
        return {m["id"] for m in (await r.json())["data"] if m["parent"] is not None}


async def test_sdk_through_gateway_to_real_vllm(
    real_vllm: Replica,
    http: aiohttp.ClientSession,
    lora_paths: dict[int, list[str]],
    unique_name: str,
) -> None:
    names = [f"{unique_name}-r8", f"{unique_name}-r16"]
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
        "adapters": [
            {"name": names[0], "path": lora_paths[8][0], "rank": 8},
            {"name": names[1], "path": lora_paths[16][0], "rank": 16},
        ],
        "poller": {"interval_s": 0.5},
    }
    async with running_gateway(config_from_mapping(doc), port=0) as gw, _sdk(gw.url) as client:
        done = await client.completions.create(
            model=names[0],
            prompt="hello world",
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert done.model == names[0]
        assert done.usage is not None and done.usage.completion_tokens == 5
        assert names[0] in await _registered(http, real_vllm)

        chat = await client.chat.completions.create(
            model=names[1],
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.model == names[1] and chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 4

        pieces: list[str] = []
        usage_tokens = None
        stream = await client.completions.create(
            model=names[1],
            prompt="hello",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
        assert usage_tokens == 6 and len(pieces) == 6

        # the same request straight to vLLM gives the same greedy text: the gateway is a proxy
        async with _sdk(real_vllm.base_url) as raw:
            direct = await raw.completions.create(
                model=names[0],
                prompt="hello world",
                max_tokens=5,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        assert direct.choices[0].text == done.choices[0].text

        with pytest.raises(openai.NotFoundError):
            await client.completions.create(
                model=f"{unique_name}-unknown", prompt="x", max_tokens=2
            )


@pytest.mark.parametrize(
    "fields",
    [
        b'"max_tokens": 5.0', b'"max_tokens": "5"', b'"max_tokens": true', b'"max_tokens": 5.5',
        b'"max_tokens": "5."', b'"stream": "true"', b'"stream": 1', b'"stream": "false"',
        b'"stream": 2',
    ],
)  # fmt: skip
async def test_the_gateway_reads_integers_and_booleans_as_vllm_does(
    real_vllm: Replica, http: aiohttp.ClientSession, fields: bytes
) -> None:
    # vLLM's request models are pydantic models in lax mode (5.0 and "5" are integers, "true"
    # and 1 are true): the gateway must refuse exactly what vLLM refuses, and stream when it does.
    body = b'{"model": "' + BASE.encode() + b'", "prompt": "hello", ' + fields + b"}"
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": "real0", "url": real_vllm.base_url}],
    }
    answers = []
    async with running_gateway(config_from_mapping(doc), port=0) as gw:
        for url in (real_vllm.base_url, gw.url):
            async with http.post(
                url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                answers.append((resp.status, resp.content_type))
    assert answers[0] == answers[1], answers
