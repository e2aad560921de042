"""A stream the replica ends with neither a token nor a finish reason is an error at the
client, not an empty answer that ended well. vLLM 0.32 stopped (SIGTERM) answers a stream it
had accepted but not yet started (queued behind others) with its head and ``data: [DONE]``
alone (a chat: the role chunk first; with include_usage: the usage chunk): it sends no chunk
for a choice without tokens, its abort included. The gateway relayed that as it came and
counted it a 200, so the client saw a request that "succeeded" with nothing in it (found by
tests/gateway/test_chaos_accounting.py: 1-4 such streams per run around a SIGTERM). Now the
client gets an SSE error event before the ``[DONE]``, and the request counts as
``stream_error``, when no other replica can take it (these tests have one; with another, the
request is sent there: test_stream_retry.py). So does a stream whose body ends without
``[DONE]`` before any token or finish reason (relayed as is, it was an empty 200 too)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from sse_answers import DONE, HEAD, ROLE, USAGE, chunked

from loragate.gateway import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

_TOKEN = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"text":" data: [DONE]","finish_reason":null}]}\n\n'
)


def _events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]


async def _requests_total(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'loragate_requests_total\{[^}]*status="([^"]+)"\} (\S+)', text)
    return {status: float(n) for status, n in found}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", DONE),  # a completion: nothing but [DONE]
        ("/v1/chat/completions", ROLE + DONE),  # a chat: the role chunk, then [DONE]
        ("/v1/completions", USAGE + DONE),  # include_usage: the usage chunk, then [DONE]
    ],
)
async def test_a_stream_without_a_token_or_finish_reason_ends_with_an_error_event(
    replicas: list[ScriptedReplica], path: str, body: bytes
) -> None:
    rep = replicas[0]
    rep.raw_answer = chunked(body)
    request: dict[str, Any] = {"model": BASE, "stream": True, "max_tokens": 5}
    request.update(
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "p"}
    )
    gw_cfg = gateway_config([rep.url])
    async with running_gateway(gw_cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + path, json=request) as resp:
            assert resp.status == 200
            raw = await resp.read()
        counted = await _requests_total(http, gw.url)
    events = _events(raw)
    assert raw.startswith(body[: -len(DONE)])  # what the replica sent is relayed as it came
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "upstream_error"
    assert "without a token or a finish reason" in error["message"]
    assert counted == {"stream_error": 1.0}


@pytest.mark.parametrize(
    ("path", "answer", "relayed"),
    [
        pytest.param("/v1/completions", HEAD + b"0\r\n\r\n", b"", id="nothing"),
        pytest.param("/v1/chat/completions", chunked(ROLE), ROLE, id="role-chunk"),
        pytest.param("/v1/completions", chunked(USAGE), USAGE, id="usage-chunk"),
        pytest.param(  # the last line without its newline
            "/v1/completions", chunked(USAGE.rstrip(b"\n")), USAGE.rstrip(b"\n"), id="cut"
        ),
    ],
)
async def test_a_stream_that_ends_without_done_or_a_token_ends_with_an_error_event(
    replicas: list[ScriptedReplica], path: str, answer: bytes, relayed: bytes
) -> None:
    # The body ended (well framed) without [DONE], before any output: relayed as is, the
    # client read an empty answer that ended well (the openai SDK ends its iteration quietly).
    rep = replicas[0]
    rep.raw_answer = answer
    request: dict[str, Any] = {"model": BASE, "stream": True, "max_tokens": 5}
    request.update(
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "p"}
    )
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(gw.url + path, json=request) as resp:
            assert resp.status == 200
            raw = await resp.read()
        events = _events(raw)
        assert raw.startswith(relayed)  # what the replica sent, as it came
        assert events[-1] == b"[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["message"] == (
            "replica r0 ended the stream without [DONE] before the request produced a token"
        )
        assert error["type"] == "upstream_error"
        stream = await client.completions.create(model=BASE, prompt="p", stream=True)
        with pytest.raises(openai.APIError, match=r"without \[DONE\] before"):
            async for chunk in stream:
                assert not chunk.choices or not chunk.choices[0].text
        assert await _requests_total(http, gw.url) == {"stream_error": 2.0}


async def test_a_stream_with_a_token_but_no_finish_reason_is_relayed_unchanged(
    replicas: list[ScriptedReplica],
) -> None:
    # Not vLLM's (it always ends a choice with a reason), but nothing was lost: left alone;
    # a token's text that holds "data: [DONE]" is no end of the stream either.
    rep = replicas[0]
    rep.raw_answer = chunked(_TOKEN + DONE)
    gw_cfg = gateway_config([rep.url])
    async with running_gateway(gw_cfg, port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "stream": True}
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert await resp.read() == _TOKEN + DONE
        assert await _requests_total(http, gw.url) == {"200": 1.0}


async def test_a_queued_stream_on_a_stopped_simulated_replica_is_an_error_at_the_sdk() -> None:
    cfg = ReplicaConfig(served_model_name=BASE, max_num_seqs=1, profile="fast", time_scale=0.2)
    async with run_replica(cfg, port=0) as replica:
        gw_cfg = gateway_config([replica.url])
        async with running_gateway(gw_cfg, port=0) as gw, openai_client(gw.url) as client:
            long = {"ignore_eos": True}
            running = await client.completions.create(
                model=BASE, prompt="first", max_tokens=2000, stream=True, extra_body=long
            )
            first = await anext(aiter(running))  # it runs: the only sequence slot is taken
            assert first.choices[0].finish_reason is None
            queued = await client.completions.create(
                model=BASE, prompt="second", max_tokens=5, stream=True
            )
            for _ in range(300):  # until the replica has it, waiting (bounded)
                if replica.state.engine.num_waiting >= 1:
                    break
                await asyncio.sleep(0.01)
            await replica.state.stop_engine()
            with pytest.raises(openai.APIError, match="without a token or a finish reason"):
                async for chunk in queued:
                    raise AssertionError(f"a chunk of a request never run: {chunk}")
            reasons = [c.choices[0].finish_reason async for c in running if c.choices]
            assert reasons[-1] == "abort"  # the running one: vLLM's abort chunk, relayed
