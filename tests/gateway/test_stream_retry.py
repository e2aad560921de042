"""A stream its replica stopped before it produced anything is sent to another replica, as a
non-streaming request is (loragate_upstream_retries_total{reason="engine_stopped"}, the one
retry of the request's budget). vLLM 0.32 stopped (SIGTERM) ends a stream it had accepted but
not started with its head and ``data: [DONE]`` alone (a chat: the role chunk first; with
include_usage: the usage chunk); an abort chunk without text says the same. The gateway holds
the head and those chunks until the first one with output, so that until then nothing reached
the client and the retry is invisible to it. Before, the client got the head at once and then
an SSE error event (7948a91): the request failed although another replica could run it.
A held stream that breaks off or carries the engine's error event before its first output:
test_stream_retry_failures.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from metric_counts import counts
from sse_answers import DONE, ROLE, USAGE, chunked

from loragate.gateway import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

_ABORT = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"abort",'
    b'"stop_reason":null}]}\n\n'
)
_CHAT_ABORT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"abort"}]}\n\n'
)
_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"


def _request(path: str) -> dict[str, Any]:
    request: dict[str, Any] = {"model": BASE, "stream": True, "max_tokens": 5}
    request.update(
        {"messages": [{"role": "user", "content": "hi"}]} if path == _CHAT else {"prompt": "p"}
    )
    return request


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (_COMPLETIONS, DONE),  # a completion: nothing but [DONE]
        (_CHAT, ROLE + DONE),  # a chat: the role chunk, then [DONE]
        (_COMPLETIONS, USAGE + DONE),  # include_usage: the usage chunk, then [DONE]
        (_COMPLETIONS, _ABORT + USAGE + DONE),  # an abort chunk without text
        (_CHAT, ROLE + _CHAT_ABORT + DONE),  # a chat's, after its role chunk
    ],
)
async def test_a_stream_stopped_before_any_output_is_answered_by_another_replica(
    replicas: list[ScriptedReplica], path: str, body: bytes
) -> None:
    stopped, other = replicas
    stopped.raw_answer = chunked(body)
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + path, json=_request(path)) as resp:
            assert resp.status == 200
            assert resp.headers["X-Loragate-Replica"] == "r1"
            raw = await resp.read()
        assert b'"error"' not in raw  # no error event: the client never saw r0's stream
        events = [json.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n")[:-2]]
        key = "delta" if path == _CHAT else None
        texts = [
            c["choices"][0][key]["content"] if key else c["choices"][0]["text"] for c in events
        ]
        assert "".join(texts) == " one two three" and raw.endswith(DONE)
        assert len(stopped.requests) == len(other.requests) == 1
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        # Out of rotation until a poll succeeds, as for a non-streaming request.
        healthy = [s.replica_id for s in gw.gateway.pool.healthy_snapshots()]
    assert requests == {("r1", "200"): 1}  # once, under the replica that answered
    assert retries == {("r0", "engine_stopped"): 1}
    assert healthy == ["r1"]


async def test_a_retried_stream_stopped_again_gets_the_error_event(
    replicas: list[ScriptedReplica],
) -> None:
    # One retry per request: the second replica's empty stream reaches the client with the
    # error event, as with no other replica (test_stream_unanswered.py).
    for rep in replicas:
        rep.raw_answer = chunked(ROLE + DONE)
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + _CHAT, json=_request(_CHAT)) as resp:
            assert resp.status == 200 and resp.headers["X-Loragate-Replica"] == "r1"
            raw = await resp.read()
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    events = raw.split(b"\n\n")
    assert events[0] == ROLE.removesuffix(b"\n\n")  # r1's, as it came
    assert b"without a token or a finish reason" in events[1] and events[2] == b"data: [DONE]"
    assert requests == {("r1", "stream_error"): 1}
    assert retries == {("r0", "engine_stopped"): 1}


async def test_a_queued_stream_on_a_stopped_simulated_replica_gets_its_answer_elsewhere() -> None:
    # r0 runs one sequence at a time: a long stream runs there and a second one waits behind
    # it when r0 is stopped (SIGTERM's abort): r0 ends the waiting one with [DONE] alone.
    slow = ReplicaConfig(served_model_name=BASE, max_num_seqs=1, profile="fast", time_scale=0.2)
    other = ReplicaConfig(served_model_name=BASE, profile="fast", seed=1)
    async with run_replica(slow, port=0) as r0, run_replica(other, port=0) as r1:
        cfg = gateway_config([r0.url, r1.url], routing="round_robin")
        async with (
            running_gateway(cfg, port=0) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            long = {"ignore_eos": True}
            running = await client.completions.create(  # round robin: r0
                model=BASE, prompt="first", max_tokens=2000, stream=True, extra_body=long
            )
            first = await anext(aiter(running))  # it runs: r0's only sequence slot is taken
            assert first.choices[0].finish_reason is None
            await client.completions.create(model=BASE, prompt="p", max_tokens=2)  # r1

            async def queued() -> tuple[str, list[Any]]:  # round robin: r0, where it waits
                raw = await client.completions.with_raw_response.create(
                    model=BASE, prompt="second", max_tokens=5, stream=True
                )
                return raw.headers["X-Loragate-Replica"], [c async for c in raw.parse()]

            answer = asyncio.create_task(queued())
            for _ in range(300):  # until r0 has it, waiting (bounded)
                if r0.state.engine.num_waiting >= 1:
                    break
                await asyncio.sleep(0.01)
            assert r0.state.engine.num_waiting == 1
            await r0.state.stop_engine()
            replica, chunks = await asyncio.wait_for(answer, timeout=30)
            reasons = [c.choices[0].finish_reason async for c in running if c.choices]
            requests = await counts(http, gw.url, "loragate_requests_total")
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert replica == "r1"
    assert "".join(c.choices[0].text for c in chunks if c.choices)  # a whole answer, from r1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert reasons[-1] == "abort"  # the running one: vLLM's abort chunk, relayed
    assert retries == {("r0", "engine_stopped"): 1}
    assert requests == {("r0", "stream_error"): 1, ("r1", "200"): 2}


async def test_a_held_stream_cut_at_shutdown_gets_a_503(replicas: list[ScriptedReplica]) -> None:
    # r0 sends its head and then nothing (a long prefill): the gateway holds its own head, so
    # at the shutdown's deadline nothing has reached the client and the answer is the 503 a
    # request cut before its answer started gets (retryable), not a stream's error event.
    rep = replicas[0]
    rep.head_gate = asyncio.Event()
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        sent = asyncio.create_task(http.post(gw.url + _COMPLETIONS, json=_request(_COMPLETIONS)))
        for _ in range(600):  # until r0 has it (bounded)
            if rep.requests:
                break
            await asyncio.sleep(0.05)
        assert rep.requests and not sent.done()
        finished, cut = await gw.gateway.proxy.drain(0, grace_s=30)
        async with await asyncio.wait_for(sent, timeout=30) as resp:
            assert resp.status == 503 and resp.headers["X-Loragate-Replica"] == "r0"
            error = (await resp.json())["error"]
        requests = await counts(http, gw.url, "loragate_requests_total")
        rep.head_gate.set()
    assert (finished, cut) == (0, 1)
    assert "shutting down" in error["message"]
    assert requests == {("r0", "503"): 1}


async def test_a_client_that_leaves_a_held_stream_is_counted_once(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.head_gate = asyncio.Event()
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        sent = asyncio.create_task(http.post(gw.url + _COMPLETIONS, json=_request(_COMPLETIONS)))
        for _ in range(600):  # until r0 has it (bounded)
            if rep.requests:
                break
            await asyncio.sleep(0.05)
        sent.cancel()  # the client goes away before its first token
        with pytest.raises(asyncio.CancelledError):
            await sent
        for _ in range(600):  # until r0 sees the gateway go away (bounded)
            if rep.cancelled:
                break
            await asyncio.sleep(0.05)
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert rep.cancelled == 1 and len(replicas[1].requests) == 0
    assert requests == {("r0", "client_closed"): 1} and retries == {}
