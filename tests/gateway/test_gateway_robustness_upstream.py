"""Upstream faults on the proxy path, over real loopback sockets: nothing is lost silently,
nothing is sent twice to a replica that already read it, every failure reaches the client in
the OpenAI error shape (or as a final SSE error event once a stream has started), and the
in-flight accounting returns to 0 after every kind of error."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client, wait_until

from loragate.gateway import RunningGateway, running_gateway


async def _assert_nothing_in_flight(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    """Every counter that could leak: this instance's, the shared state's, /metrics and
    /admin/replicas."""
    gateway = gw.gateway
    await wait_until(lambda: not any(gateway.inflight.counts().values()), "in-flight to drain")
    for rid in gateway.pool.replica_ids:
        assert gateway.shared.in_flight_of(rid) == 0, rid
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    gauges = [ln for ln in text.splitlines() if ln.startswith("loragate_in_flight_requests{")]
    assert gauges and all(ln.endswith(" 0.0") for ln in gauges), gauges
    headers = {"Authorization": "Bearer admin-secret"}
    async with http.get(gw.url + "/admin/replicas", headers=headers) as resp:
        listed = (await resp.json())["replicas"]
    assert listed and all(r["in_flight"] == 0 and r["in_flight_here"] == 0 for r in listed)


def _cfg(replicas: list[ScriptedReplica], **sections: Any) -> Any:
    return gateway_config([r.url for r in replicas], admin={"token": "admin-secret"}, **sections)


async def test_request_dropped_on_a_reused_connection_is_not_sent_again_to_that_replica(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json={"prompt": "warm"}) as resp:
            assert resp.status == 200  # leaves an idle keep-alive connection to r0
        rep.mode = "drop"  # r0 reads the next request, then drops the connection
        async with http.post(gw.url + "/v1/completions", json={"prompt": "once"}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "upstream_error"
        assert [b["prompt"] for b in rep.requests] == ["warm", "once"]
        await _assert_nothing_in_flight(gw, http)


_JSON = b'{"id": "cmpl-1", "object": "text_completion", "choices": []}'
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_EVENT = b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": " one"}]}\n\n'


@pytest.mark.parametrize(
    "raw",
    [
        # Content-Length body cut short by a close.
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n" + _JSON,
        # Chunked body with a broken chunk size, and one cut off before its last chunk.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n" + _JSON,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(_JSON), _JSON),
        # Not HTTP at all; a head that never ends.
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",
        b"",
    ],
)
async def test_broken_non_streaming_answers_are_502_and_nothing_leaks(
    replicas: list[ScriptedReplica], raw: bytes
) -> None:
    rep = replicas[0]
    rep.raw_answer = raw
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 502
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "upstream_error"
        assert len(rep.requests) == 1  # read once: not sent again on a fresh connection
        await _assert_nothing_in_flight(gw, http)
        # The gateway keeps serving once the replica behaves and a poll brings it back.
        rep.raw_answer = None
        await gw.gateway.pool.poll_once()
        async with openai_client(gw.url) as client:
            done = await client.completions.create(model=BASE, prompt="ok", max_tokens=1)
            assert done.choices[0].text == "hi from r0"


@pytest.mark.parametrize(
    ("tail", "texts"),
    [
        (b"", [" one"]),  # the replica closes after one event, without the final chunk
        (b"%x\r\n%s" % (len(_EVENT), _EVENT[:30]), [" one"]),  # cut in the middle of a line
        (b"%x\r\n%s\r\n" % (len(_EVENT) - 1, _EVENT[:-1]), [" one", " one"]),  # before "\n"
        (b"%x\r\n%s\r\n" % (len(_EVENT) - 2, _EVENT[:-2]), [" one"]),  # line without its end
    ],
)
async def test_broken_stream_ends_with_an_sse_error_the_sdk_raises(
    replicas: list[ScriptedReplica], tail: bytes, texts: list[str]
) -> None:
    rep = replicas[0]
    rep.raw_answer = _SSE_HEAD + b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT) + tail
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        got = []
        async with openai_client(gw.url) as client:
            stream = await client.completions.create(model=BASE, prompt="p", stream=True)
            with pytest.raises(openai.APIError, match="broke off the stream"):
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
        assert got == texts  # every complete event, then the gateway's error event
        assert len(rep.requests) == 1
        await _assert_nothing_in_flight(gw, http)


async def test_broken_stream_ends_with_done_after_its_error_event_as_vllm_does(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.raw_answer = _SSE_HEAD + b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)  # then the close
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "stream": True}
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            events = (await resp.read()).split(b"\n\n")
        assert events[-1] == b""  # every event is terminated
        error, done = events[-3], events[-2]
        assert json.loads(error.removeprefix(b"data: "))["error"]["type"] == "upstream_error"
        assert done == b"data: [DONE]"
        await _assert_nothing_in_flight(gw, http)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("split", [1, 7, 40, 1000])
async def test_stream_lines_split_across_reads_are_relayed_unchanged(
    replicas: list[ScriptedReplica], split: int
) -> None:
    events = _EVENT * 3 + b"data: [DONE]"  # the last line without a newline: passed on as is
    raw = _SSE_HEAD + b"".join(_chunk(events[i : i + split]) for i in range(0, len(events), split))
    rep = replicas[0]
    rep.raw_answer = [raw[i : i + 150] for i in range(0, len(raw), 150)] + [b"0\r\n\r\n"]
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        body = {"prompt": "p", "stream": True}
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert await resp.read() == events
        await _assert_nothing_in_flight(gw, http)


async def test_stream_broken_before_its_first_read_is_a_502(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.raw_answer = _SSE_HEAD + b"%x\r\n%s\r\nzz\r\n" % (len(_EVENT), _EVENT)
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        async with openai_client(gw.url) as client:
            with pytest.raises(openai.InternalServerError, match="bad chunk"):
                await client.completions.create(model=BASE, prompt="p", stream=True)
        await _assert_nothing_in_flight(gw, http)


async def test_replica_removed_or_marked_unhealthy_with_streams_in_flight(
    replicas: list[ScriptedReplica],
) -> None:
    gate = asyncio.Event()
    for rep in replicas:
        rep.stream_gate = gate  # every stream holds after its first event
    cfg = _cfg(replicas, routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        pool = gw.gateway.pool

        async def one_stream(i: int) -> bytes:
            body = {"model": "lora-1", "prompt": f"s{i}", "stream": True}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                return await resp.read()

        streams = [asyncio.create_task(one_stream(i)) for i in range(6)]
        await wait_until(lambda: sum(len(r.requests) for r in replicas) == 6, "6 streams to start")
        assert gw.gateway.inflight.counts() == {"r0": 3, "r1": 3}
        pool.remove_replica("r1")  # a config reload dropped it
        pool.report_failure("r0", "test: marked unhealthy")
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 503  # nothing left to route to...
            assert (await resp.json())["error"]["code"] == "no_replica_available"
        gate.set()  # ...but the streams already running finish normally
        for body in await asyncio.gather(*streams):
            assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")
        await pool.poll_once()
        await _assert_nothing_in_flight(gw, http)


async def test_concurrent_requests_for_an_unloaded_adapter_load_it_once_per_replica(
    replicas: list[ScriptedReplica],
) -> None:
    for rep in replicas:
        rep.load_delay_s = 0.2  # every request arrives while the loads are still running
    cfg = _cfg(replicas, routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with openai_client(gw.url) as client:
            done = await asyncio.gather(
                *(
                    client.completions.create(model="lora-3", prompt=f"p{i}", max_tokens=1)
                    for i in range(40)
                )
            )
        assert {d.model for d in done} == {"lora-3"}
        assert [r.load_calls for r in replicas] == [1, 1]
        assert sum(len(r.requests) for r in replicas) == 40
        await _assert_nothing_in_flight(gw, http)


async def test_concurrent_requests_for_an_adapter_that_fails_to_load(
    replicas: list[ScriptedReplica],
) -> None:
    for rep in replicas:
        rep.load_delay_s = 0.1
    cfg = _cfg(
        replicas,
        routing="round_robin",
        adapters=[{"name": "broken", "path": "/nowhere/broken"}],
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:

        async def one() -> tuple[int, dict[str, Any]]:
            body = {"model": "broken", "prompt": "p"}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                return resp.status, json.loads(await resp.read())

        answers = await asyncio.gather(*(one() for _ in range(20)))
        assert {status for status, _ in answers} == {502}
        assert {a["error"]["code"] for _, a in answers} == {"adapter_load_failed"}
        assert all(r.requests == [] for r in replicas)
        assert sum(r.load_calls for r in replicas) <= 20
        await _assert_nothing_in_flight(gw, http)
        assert all(gw.gateway.pool.is_healthy(r) for r in ("r0", "r1"))  # not the replica's fault


async def test_silent_stream_times_out_with_an_sse_error_and_the_replica_stays_in(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.stream_gate = asyncio.Event()  # never set: silence after the first event
    cfg = _cfg([rep], limits={"stream_read_timeout_s": 0.3})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with openai_client(gw.url) as client:
            stream = await client.completions.create(model=BASE, prompt="p", stream=True)
            got = []
            with pytest.raises(openai.APIError, match="did not answer in time"):
                async for chunk in stream:
                    got.append(chunk.choices[0].text)
            assert got == [" one"]
        await wait_until(lambda: rep.cancelled == 1, "the replica to see the abort")
        assert gw.gateway.pool.is_healthy("r0")  # slow is not dead
        await _assert_nothing_in_flight(gw, http)


async def test_client_leaving_during_an_adapter_load_leaks_nothing(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.load_delay_s = 0.5
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": "lora-2", "prompt": "p"}
        gone = asyncio.create_task(http.post(gw.url + "/v1/completions", json=body))
        await wait_until(lambda: rep.load_calls == 1, "the load to start")
        gone.cancel()  # the client disconnects while the gateway waits for the load
        with pytest.raises(asyncio.CancelledError):
            await gone
        await wait_until(lambda: "lora-2" in rep.adapters, "the load to finish anyway")
        await _assert_nothing_in_flight(gw, http)
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        assert rep.load_calls == 1 and rep.requests == [body]


async def test_stream_head_reaches_the_client_before_the_first_event(
    replicas: list[ScriptedReplica],
) -> None:
    # The replica sends its head and then nothing until released: the client has the gateway's
    # head (status, replica header) at once, not only with the first event. One replica, so no
    # retry is possible: with another one the head waits for the first token (1409803), so
    # that a stream stopped before any can still go to the other replica.
    rep = replicas[0]
    rep.head_gate = asyncio.Event()
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        body = {"prompt": "p", "stream": True}
        async with asyncio.timeout(10):  # a held head would wait for the gate forever
            resp = await http.post(gw.url + "/v1/completions", json=body)
        async with resp:
            assert resp.status == 200 and resp.headers["X-Loragate-Replica"] == rep.name
            assert not rep.head_gate.is_set()
            rep.head_gate.set()
            events = [e for e in (await resp.read()).split(b"\n\n") if e]
        assert len(events) == 4 and events[-1] == b"data: [DONE]"
        await _assert_nothing_in_flight(gw, http)


@pytest.mark.parametrize("pieces", [1, 2, 3])
async def test_stream_answered_in_one_read_is_relayed_whole(
    replicas: list[ScriptedReplica], pieces: int
) -> None:
    # Head, events and the final chunk in one write (or the final chunk alone after them):
    # the client gets the same head and bytes, then a properly ended body, every time.
    events = _EVENT * 2 + b"data: [DONE]\n\n"
    raw = _SSE_HEAD + _chunk(events) + b"0\r\n\r\n"
    cut = len(raw) - 5
    rep = replicas[0]
    rep.raw_answer = {1: [raw], 2: [raw[:cut], raw[cut:]], 3: [_SSE_HEAD, raw[len(_SSE_HEAD) :]]}[
        pieces
    ]
    async with running_gateway(_cfg([rep]), port=0) as gw, aiohttp.ClientSession() as http:
        for _ in range(3):
            body = {"prompt": "p", "stream": True}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200 and resp.headers["X-Loragate-Replica"] == rep.name
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert await resp.read() == events
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        counted = f'loragate_requests_total{{adapter="",replica="{rep.name}",status="200"}} 3.0'
        assert counted in text
        await _assert_nothing_in_flight(gw, http)
