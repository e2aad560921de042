"""``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk of a stream
carries its choice's running usage, after ``choices``, as vLLM 0.32 writes it (compared with
real vLLM in ``tests/e2e/test_vllm_twin_parity.py``); without ``include_usage`` it is ignored."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


async def _chunks(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_every_chunk_carries_the_running_usage(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    base = {"max_tokens": 3, "ignore_eos": True, "stream": True, "stream_options": OPTIONS}
    async with start_replica(time_scale=100.0) as r:
        completion = await _chunks(
            http, r.url + "/v1/completions", {**base, "prompt": "Hello world the adapter", "n": 2}
        )
        chat = await _chunks(
            http,
            r.url + "/v1/chat/completions",
            {**base, "messages": [{"role": "user", "content": "hi"}]},
        )
        off = {**base, "stream_options": {"continuous_usage_stats": True}}
        plain = await _chunks(http, r.url + "/v1/completions", {**off, "prompt": "hi"})
    *tokens, last = completion
    keys = ["id", "object", "created", "model", "choices", "usage"]
    assert len(tokens) == 6 and all(list(c) == keys for c in tokens)
    for index in (0, 1):
        mine = [c["usage"] for c in tokens if c["choices"][0]["index"] == index]
        assert mine == [
            {"prompt_tokens": 4, "total_tokens": 4 + k, "completion_tokens": k} for k in (1, 2, 3)
        ]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    role, *rest, final = chat
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 3
    assert role["usage"] == {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0,
                             "completion_tokens_details": None}  # fmt: skip
    assert [c["usage"]["completion_tokens"] for c in rest] == [1, 2, 3]
    assert list(rest[0])[:6] == ["id", "object", "created", "model", "choices", "usage"]
    assert "usage" not in plain[0] and all("usage" not in c for c in plain)
