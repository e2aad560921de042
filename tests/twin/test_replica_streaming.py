"""SSE streaming of the replica, with raw sockets and the official openai SDK."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import openai

StartReplica = Callable[..., Any]
MakeAdapterDir = Callable[..., str]


async def sse_events(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[str, list[str]]:
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
        ctype = resp.headers["Content-Type"]
    assert raw.endswith("\n\n")
    events = [block for block in raw.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    return ctype, [e[len("data: ") :] for e in events]


async def test_completion_stream_matches_recording(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        r.state.registry.load("lora-0", adapter_dir("lora-0"))
        body = {
            "model": "lora-0",
            "prompt": "Hello world the adapter",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        ctype, events = await sse_events(http, r.url + "/v1/completions", body)
        assert ctype == "text/event-stream; charset=utf-8"
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        token_chunks, usage = chunks[:-1], chunks[-1]
        assert len(token_chunks) == 8  # one event per token
        ids = {c["id"] for c in chunks}
        assert len(ids) == 1 and re.fullmatch(r"cmpl-[0-9a-f]{16}", ids.pop())
        first = token_chunks[0]
        assert list(first) == ["id", "object", "created", "model", "choices"]
        assert list(first["choices"][0]) == [
            "index",
            "text",
            "logprobs",
            "finish_reason",
            "stop_reason",
            "prompt_token_ids",
            "token_ids",
        ]
        assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 7 + ["length"]
        # As real vLLM 0.32: the fingerprint rides only on the usage chunk, not the last token.
        assert all("system_fingerprint" not in c for c in token_chunks)
        assert usage["choices"] == [] and list(usage["usage"]) == [
            "prompt_tokens",
            "total_tokens",
            "completion_tokens",
        ]
        assert usage["usage"]["completion_tokens"] == 8
        assert usage["system_fingerprint"] == "vllm-0.32.0-3216f9d5"
        # Streamed text equals the non-streaming text of the same greedy request.
        streamed = "".join(c["choices"][0]["text"] for c in token_chunks)
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        async with http.post(r.url + "/v1/completions", json=plain) as resp:
            assert (await resp.json())["choices"][0]["text"] == streamed


async def test_chat_stream_matches_recording(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        r.state.registry.load("lora-1", adapter_dir("lora-1", 16))
        body = {
            "model": "lora-1",
            "messages": [{"role": "user", "content": "hello model"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        _, events = await sse_events(http, r.url + "/v1/chat/completions", body)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) == 9  # role chunk + 8 tokens, no usage chunk unless asked
        role = chunks[0]
        assert role["object"] == "chat.completion.chunk"
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert list(role) == [
            "id",
            "object",
            "created",
            "model",
            "choices",
            "prompt_token_ids",
            "prompt_text",
        ]
        middle = chunks[1]["choices"][0]
        assert list(middle) == ["index", "delta", "logprobs", "finish_reason", "token_ids"]
        assert list(middle["delta"]) == ["content"]
        last = chunks[-1]
        assert last["choices"][0]["finish_reason"] == "length"
        assert last["system_fingerprint"] == "vllm-0.32.0-3216f9d5"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_openai_sdk_streaming_counts_equal_usage(
    start_replica: StartReplica, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        r.state.registry.load("lora-0", adapter_dir("lora-0"))
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        async with client:
            for max_tokens, ignore_eos in [(12, True), (30, False)]:
                stream = await client.completions.create(
                    model="lora-0",
                    prompt="count me",
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": ignore_eos},
                )
                token_events, usage = 0, None
                async for chunk in stream:
                    if chunk.choices:
                        token_events += 1
                    if chunk.usage is not None:
                        usage = chunk.usage
                assert usage is not None and usage.completion_tokens == token_events
                if ignore_eos:
                    assert token_events == max_tokens
            chat = await client.chat.completions.create(
                model="lora-0",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            content_events, chat_usage, text = 0, None, ""
            async for chunk in chat:
                for choice in chunk.choices:
                    if choice.delta.role is None:
                        content_events += 1
                        text += choice.delta.content or ""
                if chunk.usage is not None:
                    chat_usage = chunk.usage
            assert chat_usage is not None and chat_usage.completion_tokens == content_events == 6
            plain = await client.chat.completions.create(
                model="lora-0",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                extra_body={"ignore_eos": True},
            )
            assert plain.usage is not None and plain.usage.completion_tokens == 6
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny-llama", "lora-0"]


async def test_n_and_batched_prompts(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        body = {"prompt": ["a", "b c"], "n": 2, "max_tokens": 3, "ignore_eos": True}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            out = await resp.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert out["usage"]["completion_tokens"] == 12
        _, events = await sse_events(
            http,
            r.url + "/v1/completions",
            {**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        chunks = [json.loads(e) for e in events[:-1]]
        per_index: dict[int, int] = {}
        for c in chunks[:-1]:
            idx = c["choices"][0]["index"]
            per_index[idx] = per_index.get(idx, 0) + 1
        assert per_index == {0: 3, 1: 3, 2: 3, 3: 3}
        assert chunks[-1]["usage"]["completion_tokens"] == 12


async def test_x_request_id_names_the_response(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica() as r:
        body = {"prompt": "hi", "max_tokens": 2}
        headers = {"X-Request-Id": "gw-42"}
        results = []
        for _ in range(2):  # the same id twice is fine
            async with http.post(r.url + "/v1/completions", json=body, headers=headers) as resp:
                results.append((resp.status, (await resp.json())["id"]))
        assert results == [(200, "cmpl-gw-42")] * 2


async def test_engine_stop_mid_stream_ends_it_with_an_abort_chunk(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM 0.32 stopped (SIGTERM, --shutdown-timeout 0) aborts the requests in flight: a
    # stream's last chunk says finish_reason "abort" (more in test_replica_stop.py).
    async with start_replica(time_scale=1.0) as r:
        body = {"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            await resp.content.readuntil(b"\n\n")
            await r.state.stop_engine()
            rest = (await resp.read()).decode()
        events = [e[len("data: ") :] for e in rest.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        body.pop("stream")
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "ServiceUnavailableError"


async def test_leaving_run_replica_ends_streams_in_flight(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    ctx = start_replica(time_scale=0.1)  # 400 tokens would take many seconds
    r = await ctx.__aenter__()
    body = {"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
    resp = await http.post(r.url + "/v1/completions", json=body)
    try:
        await resp.content.readuntil(b"\n\n")
        await ctx.__aexit__(None, None, None)
        rest = (await resp.read()).decode()
    finally:
        resp.release()
    assert rest.endswith("data: [DONE]\n\n")
    assert '"finish_reason":"abort"' in rest and '"finish_reason":"length"' not in rest
