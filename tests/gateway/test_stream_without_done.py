"""A stream whose body ends well (chunked framing complete) without ``data: [DONE]`` after
output and without a finish reason was cut short on its way (vLLM ends every stream with
``[DONE]``, after its own error event too): the client gets the gateway's error event after
what was relayed, and the request counts as ``stream_error``. Before, it was relayed as it came:
the openai SDK ended its iteration quietly and the client took a truncated answer for a whole
one (counted 200). One that ends without ``[DONE]`` after its finish reason lost nothing: left
alone. (Real loopback sockets; one replica, so the stream goes out as it comes.)"""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from metric_counts import counts
from sse_answers import chunked

from loragate.gateway import running_gateway


def _event(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish}
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
             "choices": [choice]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def test_a_stream_cut_short_without_done_ends_with_an_error_event(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.raw_answer = chunked(_event(" one") + _event(" two"))  # then the body's end
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        stream = await client.completions.create(model=BASE, prompt="p", stream=True)
        got = []
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                got.append(chunk.choices[0].text)
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert got == [" one", " two"]
    assert raised.value.code == "upstream_unavailable"
    assert raised.value.message == (
        "replica r0 ended the stream without [DONE] and without a finish reason: its answer "
        "may be cut short"
    )
    assert requests == {("r0", "stream_error"): 1}


async def test_a_stream_without_done_after_its_finish_reason_is_relayed_as_it_came(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    body = _event(" one") + _event(" two", "length")
    rep.raw_answer = chunked(body)
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        request = {"model": BASE, "prompt": "p", "stream": True}
        async with http.post(gw.url + "/v1/completions", json=request) as resp:
            assert await resp.read() == body
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert requests == {("r0", "200"): 1}
