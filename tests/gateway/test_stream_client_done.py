"""A client that closes its connection right after reading a stream's ``data: [DONE]`` (as
``loragate loadtest`` does, and any client that breaks out of its read loop there) had the
whole answer: the request counts with the stream's outcome (200, or ``stream_error``) and its
latency is observed. vLLM (and the simulated replica) write the ``[DONE]`` and the body's end
(the last chunk of the chunked framing) in two writes; a client that closed in between had the
gateway's handler cancelled while it waited for that end, and the request counted as
``client_closed``, missing from loragate_upstream_latency_seconds (34 of 200 such streams in a
walk-through). A client that leaves before the ``[DONE]`` still counts as ``client_closed``.

Also: a stream that goes silent past ``limits.stream_read_timeout_s`` ends with an error event
whose code is ``upstream_timeout``, as a non-streaming request's timeout (it said
``upstream_unavailable``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving,
    wait_until,
)
from metric_counts import counts
from sse_answers import DONE

from loragate.gateway import running_gateway

_TOKEN = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"text":" one","finish_reason":"length"}]}\n\n'
)


class HeldEnd(ScriptedReplica):
    """Streams ``events`` (each its own write), then waits for ``gate`` (never set here)
    before the rest: ``rest``, then the body's end."""

    def __init__(self, name: str, events: list[bytes], rest: list[bytes]) -> None:
        super().__init__(name)
        self.events = events
        self.rest = rest
        self.gate = asyncio.Event()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for event in self.events:
            await resp.write(event)
        await self.gate.wait()
        for event in self.rest:
            await resp.write(event)
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def _served(rep: HeldEnd) -> AsyncIterator[tuple[HeldEnd, str]]:
    async with serving(rep.app) as (url, _):
        yield rep, url


async def _read_until(url: str, stop: bytes) -> list[bytes]:
    """POST a completions stream to the gateway at ``url``, read its lines up to the first
    that is ``stop``, then close the connection (the client leaves)."""
    lines = []
    async with aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "max_tokens": 5, "stream": True}
        resp = await http.post(url + "/v1/completions", json=body)
        assert resp.status == 200
        async for line in resp.content:
            lines.append(line)
            if line.strip() == stop:
                break
        resp.close()  # the connection goes, with the rest of the answer unread
    return lines


async def _latency_count(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'loragate_upstream_latency_seconds_count\{replica="r0"\} (\S+)', text)
    return sum(float(n) for n in found)


@pytest.mark.parametrize(
    ("events", "replicas_served", "status"),
    [
        ([_TOKEN, DONE], 1, "200"),  # a whole answer
        ([_TOKEN, DONE], 2, "200"),  # held until its first token (another replica could take it)
        ([_TOKEN, b"data: [DONE]\n", b"\n"], 1, "200"),  # [DONE]'s blank line written apart
        ([DONE], 1, "stream_error"),  # no token: the gateway's error event, then [DONE]
    ],
)
async def test_a_client_that_closes_after_done_counts_with_the_streams_outcome(
    replicas: list[ScriptedReplica], events: list[bytes], replicas_served: int, status: str
) -> None:
    async with _served(HeldEnd("r0", events, [])) as (rep, url):
        urls = [url, *(r.url for r in replicas[1:replicas_served])]
        cfg = gateway_config(urls, routing="round_robin")
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
            lines = await _read_until(gw.url, b"data: [DONE]")
            # The gateway closes its connection to the replica once the client went away.
            await wait_until(lambda: rep.cancelled == 1, "the replica to see the gateway go")
            requests = await counts(http, gw.url, "loragate_requests_total")
            latencies = await _latency_count(http, gw.url)
    assert lines[-1] == b"data: [DONE]\n"
    assert requests == {("r0", status): 1}
    assert latencies == 1.0


async def test_a_client_that_leaves_before_done_counts_as_client_closed(
    replicas: list[ScriptedReplica],
) -> None:
    second = _TOKEN.replace(b" one", b" two").replace(b'"length"', b"null")
    async with (
        _served(HeldEnd("r0", [second], [_TOKEN, DONE])) as (rep, url),
        running_gateway(gateway_config([url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        lines = await _read_until(gw.url, second.strip())
        await wait_until(lambda: rep.cancelled == 1, "the replica to see the gateway go")
        requests = await counts(http, gw.url, "loragate_requests_total")
        latencies = await _latency_count(http, gw.url)
    assert lines[-1] == second.strip() + b"\n"
    assert requests == {("r0", "client_closed"): 1}
    assert latencies == 0.0


async def test_a_silent_stream_ends_with_an_upstream_timeout_event(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.stream_gate = asyncio.Event()  # never set: silence after the first event
    cfg = gateway_config([rep.url], limits={"stream_read_timeout_s": 0.3})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with openai_client(gw.url) as client:
            stream = await client.completions.create(model=BASE, prompt="p", stream=True)
            got = []
            with pytest.raises(openai.APIError) as raised:
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert got == [" one"]
    assert raised.value.code == "upstream_timeout"
    assert raised.value.message == (
        "replica r0 did not answer in time: its stream was silent for 0.3 s"
    )
    assert requests == {("r0", "stream_error"): 1}
