"""A held stream (another replica could take the request, nothing of it reached the client yet)
that fails before its first output is sent to another replica, as a stream vLLM stopped before
any output is (test_stream_retry.py): counted in
loragate_upstream_retries_total{reason="engine_stopped"} (the request's one retry), the replica
out of rotation until a poll succeeds, the client none the wiser. Failing here: the replica
drops the connection or garbles its chunked framing, ends the stream without ``[DONE]``, or
sends vLLM's engine-dead error event (``EngineDeadError``: its engine died). Before, the client
got the head at once and then an SSE error event (the gateway's "broke off the stream", the
replica's own) or an empty stream that ended well: the request failed although another replica
could run it.

What stays as it was: a stream that fails after output reached the client ends with an error
event (test_gateway_faults.py::test_stream_dying_midway_ends_with_an_error_event); a read that
timed out is not retried (the replica may still be working on the request, as for a
non-streaming one); an error event that is not the engine's is relayed as is; the retry is
spent once (the second replica's break reaches the client)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from metric_counts import counts
from sse_answers import DONE, HEAD, ROLE, chunked

from loragate.gateway import running_gateway

_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"
# vLLM 0.32's in-band EngineDeadError (create_streaming_error_response: json.dumps' spaces), and
# the simulated replica's (no spaces).
_ENGINE_DEAD = (
    b'data: {"error": {"message": "EngineCore encountered an issue. See stack trace (above) '
    b'for the root cause.", "type": "InternalServerError", "param": null, "code": 500}}\n\n'
)
_TWIN_ENGINE_DEAD = (
    b'data: {"error":{"message":"EngineCore encountered an issue. See stack trace (above) for '
    b'the root cause.","type":"InternalServerError","param":null,"code":500}}\n\n'
)
_OTHER_ERROR = (
    b'data: {"error": {"message": "This model\'s maximum context length is 2048 tokens.", '
    b'"type": "BadRequestError", "param": null, "code": 400}}\n\n'
)
_LAST_CHUNK = b"0\r\n\r\n"


def _piece(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        # The connection dropped after the head (and a chat's role chunk), 10 ms later.
        pytest.param(_COMPLETIONS, [HEAD, b""], id="dropped"),
        pytest.param(_CHAT, [HEAD + _piece(ROLE), b""], id="dropped-chat"),
        # The chunked framing garbled after the role chunk (a body cut short).
        pytest.param(_CHAT, [HEAD + _piece(ROLE), b"zz\r\n"], id="garbled-chat"),
        # The stream ended, well framed, without [DONE]: nothing, or a role chunk.
        pytest.param(_COMPLETIONS, HEAD + _LAST_CHUNK, id="no-done"),
        pytest.param(_CHAT, chunked(ROLE), id="no-done-chat"),
        # The engine died before the first token: its error event, then [DONE].
        pytest.param(_COMPLETIONS, chunked(_ENGINE_DEAD + DONE), id="engine-dead"),
        pytest.param(_CHAT, chunked(ROLE + _ENGINE_DEAD + DONE), id="engine-dead-chat"),
        pytest.param(_COMPLETIONS, chunked(_TWIN_ENGINE_DEAD + DONE), id="engine-dead-twin"),
    ],
)
async def test_a_held_stream_that_fails_before_any_output_is_answered_by_another_replica(
    replicas: list[ScriptedReplica], path: str, answer: bytes | list[bytes]
) -> None:
    failing, other = replicas
    failing.raw_answer = answer
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        if path == _CHAT:
            raw: Any = await client.chat.completions.with_raw_response.create(
                model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()])
        else:
            raw = await client.completions.with_raw_response.create(
                model=BASE, prompt="p", stream=True
            )
            text = "".join([c.choices[0].text async for c in raw.parse()])
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        healthy = [s.replica_id for s in gw.gateway.pool.healthy_snapshots()]
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert text == " one two three"  # r1's whole answer; nothing of r0's reached the client
    assert len(failing.requests) == len(other.requests) == 1
    assert requests == {("r1", "200"): 1}  # once, under the replica that answered
    assert retries == {("r0", "engine_stopped"): 1}
    assert healthy == ["r1"]  # out of rotation until a poll succeeds


async def test_the_second_replica_breaking_off_too_reaches_the_client(
    replicas: list[ScriptedReplica],
) -> None:
    # One retry per request: r1's stream is not held, its break is the client's error event.
    for rep in replicas:
        rep.raw_answer = [HEAD + _piece(ROLE), b""]
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        raw = await client.chat.completions.with_raw_response.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert raw.headers["X-Loragate-Replica"] == "r1"
        roles = []
        with pytest.raises(openai.APIError, match=r"^replica r1 broke off the stream: "):
            async for chunk in raw.parse():
                roles.append(chunk.choices[0].delta.role)
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert roles == ["assistant"]  # r1's role chunk, relayed
    assert requests == {("r1", "stream_error"): 1}
    assert retries == {("r0", "engine_stopped"): 1}


async def test_the_second_replica_ending_without_done_too_gets_the_error_event(
    replicas: list[ScriptedReplica],
) -> None:
    # r1's stream is not held (the retry is spent): it ends without [DONE] before any output,
    # so the client gets r1's role chunk, then an error event (test_stream_unanswered.py).
    for rep in replicas:
        rep.raw_answer = chunked(ROLE)
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        raw = await client.chat.completions.with_raw_response.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert raw.headers["X-Loragate-Replica"] == "r1"
        roles = []
        with pytest.raises(openai.APIError, match=r"^replica r1 ended the stream without \[DONE\]"):
            async for chunk in raw.parse():
                roles.append(chunk.choices[0].delta.role)
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert roles == ["assistant"]
    assert requests == {("r1", "stream_error"): 1}
    assert retries == {("r0", "engine_stopped"): 1}


async def test_a_held_stream_that_times_out_is_not_sent_again(
    replicas: list[ScriptedReplica],
) -> None:
    # r0 sends its head, then nothing past stream_read_timeout_s: it may still be working on
    # the request, so it is not run a second time elsewhere (as a non-streaming one is not).
    held = replicas[0]
    held.head_gate = gate = asyncio.Event()
    cfg = gateway_config(
        [r.url for r in replicas], routing="round_robin", limits={"stream_read_timeout_s": 0.3}
    )
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        stream = await client.completions.create(model=BASE, prompt="p", stream=True)
        with pytest.raises(openai.APIError, match=r"^replica r0 did not answer in time") as err:
            async for chunk in stream:
                raise AssertionError(f"a chunk r0 never sent: {chunk}")
        assert err.value.code == "upstream_timeout"
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        gate.set()
    assert len(replicas[1].requests) == 0
    assert requests == {("r0", "stream_error"): 1} and retries == {}


async def test_an_error_event_that_is_not_the_engines_is_relayed_as_is(
    replicas: list[ScriptedReplica],
) -> None:
    replicas[0].raw_answer = chunked(_OTHER_ERROR + DONE)
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "stream": True}
        async with http.post(gw.url + _COMPLETIONS, json=body) as resp:
            assert resp.headers["X-Loragate-Replica"] == "r0"
            assert await resp.read() == _OTHER_ERROR + DONE
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert len(replicas[1].requests) == 0
    assert requests == {("r0", "stream_error"): 1} and retries == {}
