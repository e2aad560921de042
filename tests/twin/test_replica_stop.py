"""The simulated replica stopped with requests in flight answers them as vLLM 0.32 does on
SIGTERM (default ``--shutdown-timeout 0``: ``EngineCore._handle_shutdown`` aborts every
unfinished request): a non-streaming request gets a 200 with the text so far,
``finish_reason: "abort"`` and the usage so far; a stream ends with a last chunk
``finish_reason: "abort"`` (empty text, vLLM's recorded bytes) for each choice that sent text,
then the usage chunk if asked, then ``[DONE]``. Over loopback, stopped with
``ReplicaState.stop_engine`` (what leaving ``run_replica`` does)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import openai

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]  # (conftest's)
BASE_MODEL = "tiny-llama"
LONG = {"max_tokens": 400, "ignore_eos": True}


async def _tokens_out(r: RunningReplica, at_least: int) -> None:
    """Until the engine emitted ``at_least`` tokens (bounded: 30 s of polling)."""
    for _ in range(3000):
        if r.state.counters.generation_tokens_total >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine emitted no tokens")


async def _waiting(r: RunningReplica, n: int) -> None:
    """Until ``n`` requests wait in the engine's queue (bounded: 30 s of polling). A request
    joins it at its arrival on the engine's clock, which lags the wall clock on a loaded
    machine: until then it is an arrival still to come, not counted in ``num_waiting``."""
    for _ in range(3000):
        if r.state.engine.num_waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {n} waiting requests")


def _events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


async def test_a_request_in_flight_is_answered_with_what_it_has(
    start_replica: StartReplica,
) -> None:
    async with start_replica(time_scale=0.2) as r:
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
        async with client:
            pending = asyncio.create_task(
                client.completions.create(model=BASE_MODEL, prompt="long", n=2, extra_body=LONG)
            )
            chat = asyncio.create_task(
                client.chat.completions.create(
                    model=BASE_MODEL,
                    messages=[{"role": "user", "content": "hi"}],
                    extra_body=LONG,
                )
            )
            await _tokens_out(r, 6)
            await r.state.stop_engine()
            done = await pending
            answered = await chat
        assert [c.finish_reason for c in done.choices] == ["abort", "abort"]
        assert done.usage is not None and 0 < done.usage.completion_tokens < 800
        assert all(c.text for c in done.choices)  # both choices run in every step
        (choice,) = answered.choices
        assert choice.finish_reason == "abort" and answered.usage is not None
        assert 0 < answered.usage.completion_tokens < 400
        assert choice.message.content is not None and len(choice.message.content) > 0
        success = r.state.counters.success_by_reason
        assert success.get("abort") == 3 and success.get("length") is None


async def test_a_stream_in_flight_ends_with_an_abort_chunk(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    async with start_replica(time_scale=0.2) as r:
        for usage in (False, True):
            body: dict[str, Any] = {"prompt": "long", "stream": True, **LONG}
            if usage:
                body["stream_options"] = {"include_usage": True}
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                first = await resp.content.readuntil(b"\n\n")  # one token out
                await r.state.stop_engine()
                events = _events(first + await resp.read())
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            last = chunks[-2] if usage else chunks[-1]
            # vLLM 0.32's bytes: empty text, "abort", the fingerprint unless a usage chunk
            # follows (tests/gateway/test_engine_stopped.py's VLLM_ABORTED_STREAM_END).
            assert last["choices"] == [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": "abort",
                 "stop_reason": None, "prompt_token_ids": None, "token_ids": None}
            ]  # fmt: skip
            assert ("system_fingerprint" in last) is not usage
            tokens = chunks[:-2] if usage else chunks[:-1]
            assert tokens and all(c["choices"][0]["finish_reason"] is None for c in tokens)
            if usage:
                assert chunks[-1]["choices"] == []
                assert chunks[-1]["usage"]["completion_tokens"] >= len(tokens)
            await r.state.start_engine()


async def test_a_chat_stream_and_a_choice_without_tokens(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    # max_num_seqs 1: the second request waits, no token out when the replica stops. vLLM sends
    # no empty chunk for it (chat: its role chunk was sent; a completions echo still is).
    async with start_replica(time_scale=0.2, max_num_seqs=1) as r:
        first = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **LONG}
        second = {"prompt": "waits", "stream": True, "echo": True, **LONG}
        async with (
            http.post(r.url + "/v1/chat/completions", json=first) as running,
            http.post(r.url + "/v1/completions", json=second) as waiting,
        ):
            await running.content.readuntil(b"\n\n")  # the role chunk
            await running.content.readuntil(b"\n\n")  # a token
            await _waiting(r, 1)  # the second (the first holds the only seat)
            await r.state.stop_engine()
            chat_events = _events(await running.read())
            waiting_events = _events(await waiting.read())
        last = json.loads(chat_events[-2])
        assert chat_events[-1] == "[DONE]"
        assert last["choices"][0]["finish_reason"] == "abort"
        assert last["choices"][0]["delta"] == {"content": ""}
        assert last["system_fingerprint"]
        assert waiting_events[-1] == "[DONE]" and len(waiting_events) == 2
        (echo,) = json.loads(waiting_events[0])["choices"]
        assert (echo["text"], echo["finish_reason"]) == ("waits", "abort")
        assert echo["prompt_token_ids"]
