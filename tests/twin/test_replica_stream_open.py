"""A chat stream's role chunk goes out with the request's first output, as vLLM 0.32 writes it
(``chat_completion/serving.py``: ``first_iteration``, at the engine's first ``RequestOutput``).

The response head is sent at once; the role chunk (and a chat echo) only when the engine has the
request's first token, or its abort when the replica stops first. Before, the simulated replica
wrote the role chunk as the stream opened, so a client timing its first chunk saw no queueing
and no prefill. Real vLLM and the twin side by side: ``tests/e2e/test_vllm_stream_open.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
LONG = {"max_tokens": 400, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _until(r: RunningReplica, *, running: int = 0, waiting: int = 0) -> None:
    """Until the engine runs ``running`` and holds ``waiting`` requests (bounded: 30 s of
    polling)."""
    for _ in range(3000):
        if r.state.engine.num_running >= running and r.state.engine.num_waiting >= waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {running} running and {waiting} waiting requests")


def _data(line: bytes) -> dict[str, Any]:
    assert line.startswith(b"data: "), line
    parsed: dict[str, Any] = json.loads(line[6:])
    return parsed


async def test_a_queued_chat_stream_gets_its_role_chunk_when_it_runs(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # max_num_seqs 1: the chat waits behind a long completion.
    async with start_replica(time_scale=0.5, max_num_seqs=1) as r:
        blocker = asyncio.create_task(
            http.post(r.url + "/v1/completions", json={"prompt": "first", **LONG})
        )
        await _until(r, running=1)
        body = {**CHAT, "max_tokens": 3, "ignore_eos": True}
        async with http.post(r.url + "/v1/chat/completions", json=body) as chat:
            assert chat.status == 200  # the head: sent while the request waits
            # The chat joins the waiting queue at its arrival on the engine's clock, which lags
            # the wall clock by a step or more on a loaded machine: until the engine reaches it,
            # it is an arrival still to come, neither waiting nor running (it waited 0 of 1 in
            # 6 of 20 runs beside 3 CPU burners when this asserted at once). Waiting (the blocker
            # holds the only seat), it has had no output: the head went out before any.
            await _until(r, running=1, waiting=1)
            first = await chat.content.readuntil(b"\n\n")
            # The first data came with the first token: the chat is no longer waiting (before:
            # the role chunk came at once, with the request still queued).
            assert r.state.engine.num_waiting == 0
            rest = await chat.read()
        (await blocker).close()
    role = _data(first.strip())
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    events = [_data(e) for e in rest.strip().split(b"\n\n")[:-1]]
    assert [list(e["choices"][0]["delta"]) for e in events] == [["content"]] * 3
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]


async def test_n_choices_and_echo_open_together_before_the_first_token(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM: every choice's role chunk, then every choice's echo, then the tokens.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once"}]
    body = {"messages": messages, "stream": True, "n": 2, "echo": True, "max_tokens": 2,
            "ignore_eos": True, "add_generation_prompt": False,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    async with start_replica() as r, http.post(r.url + "/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    chunks = [_data(e) for e in raw.strip().split(b"\n\n")[:-1]]
    heads = [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:4]]
    assert heads == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
        (0, {"content": "Once"}),
        (1, {"content": "Once"}),
    ]
    # Written with the first token, they still count no completion token.
    assert [c["usage"]["completion_tokens"] for c in chunks[:4]] == [0, 0, 0, 0]
    assert {c["usage"]["completion_tokens"] for c in chunks[4:-1]} == {1, 2}


async def test_a_chat_stopped_before_its_first_token_gets_its_role_chunk_then_done(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # vLLM 0.32 stopped (SIGTERM): the abort is the request's first output, so the role chunk
    # goes out with it, then no empty chunk for a choice without tokens, then [DONE].
    async with start_replica(time_scale=0.2, max_num_seqs=1) as r:
        blocker = asyncio.create_task(
            http.post(r.url + "/v1/completions", json={"prompt": "first", **LONG})
        )
        await _until(r, running=1)
        async with http.post(r.url + "/v1/chat/completions", json={**CHAT, **LONG}) as chat:
            await _until(r, waiting=1)
            await r.state.stop_engine()
            raw = await chat.read()
        (await blocker).close()
    events = raw.strip().split(b"\n\n")
    assert events[-1] == b"data: [DONE]"
    (role,) = [_data(e) for e in events[:-1]]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
