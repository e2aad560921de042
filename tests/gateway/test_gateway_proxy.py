"""The gateway in front of scripted replicas, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import running_gateway


async def test_completions_and_chat_through_the_sdk(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        done = await client.completions.create(model="lora-0", prompt="hello", max_tokens=3)
        assert done.model == "lora-0" and done.choices[0].text.startswith("hi from r")
        assert done.usage is not None and done.usage.total_tokens == 7
        chat = await client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None
        pieces = []
        stream = await client.chat.completions.create(
            model="lora-1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
        assert "".join(pieces) == " one two three"
        text = []
        async for c in await client.completions.create(model="lora-1", prompt="x", stream=True):
            text.append(c.choices[0].text)
        assert "".join(text) == " one two three"
    # Upstreams got the original request bodies.
    seen = [b["model"] for r in replicas for b in r.requests]
    assert sorted(seen) == sorted(["lora-0", BASE, "lora-1", "lora-1"])


async def test_streams_are_relayed_as_they_arrive(replicas: list[ScriptedReplica]) -> None:
    gate = asyncio.Event()
    for r in replicas:
        r.stream_gate = gate  # the upstream holds its stream after the first event
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        stream = await client.completions.create(model=BASE, prompt="x", stream=True)
        it = stream.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), timeout=10)  # arrives before the gate
        assert first.choices[0].text == " one"
        gate.set()
        rest = [c.choices[0].text async for c in it]
        assert rest == [" two", " three"]


async def test_adapter_is_loaded_once_on_demand(replicas: list[ScriptedReplica]) -> None:
    for r in replicas:
        r.load_delay_s = 0.1
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        results = await asyncio.gather(
            *(
                client.completions.create(model="lora-2", prompt="p", max_tokens=2)
                for _ in range(12)
            )
        )
        assert all(r.model == "lora-2" for r in results)
        # Every replica that got traffic registered it, with exactly one admin call each.
        used = [r for r in replicas if r.requests]
        assert used and all(r.load_calls == 1 and "lora-2" in r.adapters for r in used)
        loads = gw.gateway.pool.adapter_loads()
        assert sum(loads.values()) == len(used)


async def test_forgotten_adapter_is_reloaded(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        await client.completions.create(model="lora-0", prompt="p", max_tokens=2)
        replicas[0].adapters.clear()  # the replica restarted; the gateway does not know yet
        again = await client.completions.create(model="lora-0", prompt="p", max_tokens=2)
        assert again.model == "lora-0" and replicas[0].load_calls == 2


async def test_unknown_model_is_404_in_openai_shape(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="no-such-adapter", prompt="p")
        assert info.value.status_code == 404
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == "model"
        assert "no-such-adapter" in body["message"]
    assert not any(r.requests for r in replicas)


async def test_auth_and_tenant_isolation(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        tenants=[
            {"name": "acme", "api_keys": ["sk-acme"]},
            {"name": "beta", "api_keys": ["sk-beta"]},
        ],
        adapters=[
            {"name": "acme-lora", "path": "/loras/a", "tenants": ["acme"]},
            {"name": "beta-lora", "path": "/loras/b", "tenants": ["beta"]},
            {"name": "shared", "path": "/loras/s"},
        ],
    )
    async with running_gateway(cfg, port=0) as gw:
        async with openai_client(gw.url, "wrong") as anon:
            with pytest.raises(openai.AuthenticationError):
                await anon.completions.create(model=BASE, prompt="p")
            with pytest.raises(openai.AuthenticationError):
                await anon.models.list()
        async with (
            aiohttp.ClientSession() as http,
            http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp,
        ):
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with (
            openai_client(gw.url, "sk-acme") as acme,
            openai_client(gw.url, "sk-beta") as beta,
        ):
            ok = await acme.completions.create(model="acme-lora", prompt="p", max_tokens=2)
            assert ok.model == "acme-lora"
            with pytest.raises(openai.NotFoundError):
                await beta.completions.create(model="acme-lora", prompt="p")
            acme_models = [m.id async for m in acme.models.list()]
            beta_models = [m.id async for m in beta.models.list()]
        assert acme_models == [BASE, "acme-lora", "shared"]
        assert beta_models == [BASE, "beta-lora", "shared"]


# Refused as vLLM 0.32 refuses them (tests/gateway/test_vllm_validation.py): request
# validation is "Bad Request" with the location as param, vLLM's own checks "BadRequestError".
_VALIDATION, _VLLM_CHECK = "Bad Request", "BadRequestError"


@pytest.mark.parametrize(
    ("path", "body", "err_type", "param"),
    [
        ("/v1/completions", b'{"model": "lora-0", "prompt": ', _VALIDATION, "body.30"),
        ("/v1/completions", b"\xff\xfe not utf8", _VALIDATION, None),
        ("/v1/completions", b"[1, 2]", _VALIDATION, "body"),
        ("/v1/completions", b"", _VALIDATION, "body"),
        ("/v1/completions", b'{"model": 5, "prompt": "p"}', _VALIDATION, "body.model"),
        ("/v1/completions", b'{"model": "lora-0"}', _VLLM_CHECK, "prompt"),
        ("/v1/completions", b'{"prompt": "p", "stream": "yes please"}', _VALIDATION, "body.stream"),
        ("/v1/completions", b'{"prompt": "p", "max_tokens": 0}', _VLLM_CHECK, "max_tokens"),
        ("/v1/chat/completions", b'{"model": "lora-0", "messages": "hi"}', _VALIDATION,
         "body.messages"),
    ],
)  # fmt: skip
async def test_bad_requests_are_400(
    replicas: list[ScriptedReplica], path: str, body: bytes, err_type: str, param: str | None
) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/json"}
        async with http.post(gw.url + path, data=body, headers=headers) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert (err["type"], err["param"], err["code"]) == (err_type, param, 400)
        # ...and the gateway keeps serving.
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 200
    assert all(b.get("prompt") == "p" for r in replicas for b in r.requests)


async def test_body_over_the_limit_is_413(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas], limits={"max_body_bytes": 1000})
    big = json.dumps({"model": BASE, "prompt": "x" * 2000}).encode()
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", data=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"

        async def chunks() -> object:  # no Content-Length: chunked transfer encoding
            for i in range(0, len(big), 256):
                yield big[i : i + 256]

        async with http.post(gw.url + "/v1/completions", data=chunks()) as resp:
            assert resp.status == 413
        async with openai_client(gw.url) as client:
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model=BASE, prompt="x" * 2000)
            assert info.value.status_code == 413
            ok = await client.completions.create(model=BASE, prompt="small", max_tokens=1)
            assert ok.model == BASE
    assert all(b["prompt"] == "small" for r in replicas for b in r.requests)
