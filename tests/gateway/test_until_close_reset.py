"""An answer framed by the connection's close (HTTP/1.1 200 without Content-Length or chunked
framing: some proxies send that) that the replica *resets* before its end (a crash) is cut
short, not complete: a stream that sent output ends with the gateway's error event
(``stream_error``), a non-streaming answer is retried once on another replica (else a 502).
Before, the reset was taken as the body's end: a truncated stream relayed as a success, a 200
with cut-off JSON (real loopback sockets; the replica resets with SO_LINGER 0)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

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
    serving_replicas,
)
from metric_counts import counts

from loragate.gateway import running_gateway


def _event(text: str) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": None}
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
             "choices": [choice]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class ResetsUntilClose(ScriptedReplica):
    """Answers with a body framed by the connection's close, sends part of it, then resets
    the connection (RST, not FIN)."""

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        transport = request.transport
        assert transport is not None
        if body.get("stream"):
            head = b"Content-Type: text/event-stream"
            part = _event(" one") + _event(" two")
        else:
            head = b"Content-Type: application/json"
            part = b'{"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "hel'
        transport.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nConnection: close\r\n\r\n" + part)
        await asyncio.sleep(0.2)  # the bytes are out
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # RST
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_a_stream_reset_before_its_close_ends_with_an_error_event() -> None:
    rep = ResetsUntilClose("r0")
    async with (
        serving(rep.app) as (url, _),
        running_gateway(gateway_config([url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with openai_client(gw.url) as client:
            stream = await client.completions.create(model=BASE, prompt="p", stream=True)
            got = []
            with pytest.raises(openai.APIError) as raised:
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert got == [" one", " two"]
    assert raised.value.code == "upstream_unavailable"
    assert raised.value.message == (
        "replica r0 broke off the stream: connection reset in the middle of the answer"
    )
    assert requests == {("r0", "stream_error"): 1}


async def test_an_answer_reset_before_its_close_is_a_502_without_another_replica() -> None:
    rep = ResetsUntilClose("r0")
    async with (
        serving(rep.app) as (url, _),
        running_gateway(gateway_config([url]), port=0) as gw,
        openai_client(gw.url) as client,
    ):
        with pytest.raises(openai.APIStatusError) as raised:
            await client.completions.create(model=BASE, prompt="p")
    assert raised.value.status_code == 502
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["message"] == "replica r0: connection reset in the middle of the answer"


async def test_an_answer_reset_before_its_close_is_retried_on_another_replica() -> None:
    def make(name: str) -> ScriptedReplica:
        return ResetsUntilClose(name) if name == "r0" else ScriptedReplica(name)

    async with serving_replicas(make) as reps:
        cfg = gateway_config([r.url for r in reps], routing="round_robin")
        async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
            async with openai_client(gw.url) as client:
                # Round robin: one of the two requests goes to r0 first.
                answers = [await client.completions.create(model=BASE, prompt="p") for _ in "ab"]
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert [a.choices[0].text for a in answers] == ["hi from r1", "hi from r1"]
    assert len(reps[0].requests) == 1
    assert retries == {("r0", "dropped"): 1}
