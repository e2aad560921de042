"""Every request that fails after a replica was chosen names that replica: in the
``X-Loragate-Replica`` header of its error answer, in ``loragate_requests_total`` and in the log
line (with the request id) when its answer had already started. No request ends without an
answer, a count or a log line: a client that goes away is counted with its replica too.
Real loopback sockets; waits are bounded only as hang guards."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import openai
import pytest
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    gateway_in_background,
    openai_client,
    wait_until,
)

from loragate.gateway import RunningGateway, running_gateway
from loragate.gateway.proxy import REPLICA_HEADER

PROXY_LOG = "loragate.gateway.proxy"


def _count(gw: RunningGateway, replica: str, status: str, adapter: str = "") -> float:
    """``loragate_requests_total`` for one label set, read from the gateway's own registry
    (also after its shutdown, when /metrics cannot be scraped any more)."""
    text = gw.gateway.telemetry.render().decode()
    labels = f'adapter="{adapter}",replica="{replica}",status="{status}"'
    match = re.search(r"^loragate_requests_total\{" + re.escape(labels) + r"\} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _proxy_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The proxy's log lines, each generated request id (``<instance prefix>-<n>``) shown as
    its count ``n`` (``request 1``: the gateway's first request)."""
    return [
        _GENERATED_ID.sub(r"request \1 ", r.getMessage())
        for r in caplog.records
        if r.name == PROXY_LOG
    ]


_GENERATED_ID = re.compile(r"^request [0-9a-f]{12}-(\d+) ")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_timeout_answer_names_the_replica(
    replicas: list[ScriptedReplica], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=PROXY_LOG)
    replicas[0].mode = "hang"
    cfg = gateway_config(
        [replicas[0].url], limits={"request_timeout_s": 0.3, "stream_read_timeout_s": 0.3}
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "stream": stream}
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 504
            assert resp.headers.get(REPLICA_HEADER) == "r0"
            assert (await resp.json())["error"]["code"] == "upstream_timeout"
        assert _count(gw, "r0", "504") == 1
    # The log line names the request and the replica (with its URL, which clients never see).
    (line,) = [m for m in _proxy_logs(caplog) if "did not answer in time" in m]
    assert line.startswith("request 1 (model <base>) on replica r0 (" + replicas[0].url)


async def test_a_502_names_the_replica_that_failed_last(replicas: list[ScriptedReplica]) -> None:
    for rep in replicas:
        rep.mode = "drop"
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "upstream_error"
            failed = resp.headers.get(REPLICA_HEADER)
        # Tried on one replica, retried once on the other: the answer names the second.
        first, second = [r.name for r in replicas if r.requests]
        assert failed == second and first != second
        assert _count(gw, second, "502") == 1 and _count(gw, "", "502") == 0


async def test_a_broken_error_answer_to_a_stream_request_names_the_replica(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """A stream request that the replica answers with an error status, whose body then breaks
    off: a 502 naming the replica, and a log line."""
    caplog.set_level(logging.WARNING, logger=PROXY_LOG)
    rep = replicas[0]
    rep.raw_answer = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b'content-length: 200\r\n\r\n{"error": {"message": "cut'
    )
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/completions", json={"prompt": "p", "stream": True}) as resp,
    ):
        assert resp.status == 502
        assert resp.headers.get(REPLICA_HEADER) == "r0"
        assert _count(gw, "r0", "502") == 1
    assert any(
        m.startswith("request 1 (model <base>) on replica r0 (") and "its 400 answer" in m
        for m in _proxy_logs(caplog)
    )


async def test_a_stream_that_breaks_off_is_logged_and_counted_with_its_replica(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=PROXY_LOG)
    replicas[0].mode = "die_mid_stream"
    async with (
        running_gateway(gateway_config([replicas[0].url]), port=0) as gw,
        openai_client(gw.url) as client,
    ):
        response = await client.completions.with_raw_response.create(
            model=BASE, prompt="p", stream=True
        )
        assert response.headers.get(REPLICA_HEADER) == "r0"  # sent with the head
        with pytest.raises(openai.APIError, match="replica r0 broke off the stream"):
            async for _ in response.parse():
                pass
        assert _count(gw, "r0", "stream_error") == 1
    (line,) = [m for m in _proxy_logs(caplog) if "broke" in m or "streaming" in m]
    assert line.startswith("request 1 (model <base>) on replica r0 (")
    assert "failed while streaming (after " in line


async def test_requests_cut_at_shutdown_are_counted_with_their_replica(
    replicas: list[ScriptedReplica],
) -> None:
    rep = replicas[0]
    rep.answer_gate = asyncio.Event()  # the replica holds non-streaming answers
    rep.stream_gate = asyncio.Event()  # ...and streams after their first event
    cfg = gateway_config([rep.url])
    async with (
        gateway_in_background(cfg, shutdown_timeout_s=0.2) as (gw, stop, shutdown),
        openai_client(gw.url) as client,
    ):
        stream = await client.completions.create(model=BASE, prompt="s", stream=True)
        events = stream.__aiter__()
        await events.__anext__()
        plain = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
        await wait_until(lambda: len(rep.requests) == 2, "both requests to reach the replica")
        stop.set()
        with pytest.raises(openai.APIStatusError) as answered:
            await asyncio.wait_for(plain, timeout=30)
        assert answered.value.status_code == 503
        assert answered.value.response.headers.get(REPLICA_HEADER) == "r0"
        with pytest.raises(openai.APIError, match="shutting down"):
            async for _ in events:
                pass
        await asyncio.wait_for(shutdown, timeout=30)
    assert _count(gw, "r0", "503") == 1  # the non-streaming one, cut before its answer
    assert _count(gw, "r0", "shutdown") == 1  # the stream, cut midway
    assert _count(gw, "", "503") == 0


async def test_clients_that_go_away_are_counted_and_logged_with_the_replica(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    replicas[0].mode = "hang"
    replicas[1].stream_gate = asyncio.Event()  # r1 holds its stream after the first event
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw:
        # Non-streaming, on r0 (hangs): the client gives up while the gateway waits.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
            with pytest.raises(TimeoutError):
                async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as r:
                    await r.read()
        await wait_until(lambda: replicas[0].cancelled == 1, "r0 to see the abort")
        # Streaming, on r1: the client reads the first event, then disconnects while the
        # gateway waits for the next one.
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "p", "stream": True}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.headers.get(REPLICA_HEADER) == "r1"
                assert (await resp.content.readline()).startswith(b"data: ")
        await wait_until(lambda: replicas[1].cancelled == 1, "r1 to see the abort")
        await wait_until(lambda: _count(gw, "r1", "client_closed") == 1, "the stream's count")
        assert _count(gw, "r0", "client_closed") == 1
    logs = _proxy_logs(caplog)  # the access log's lines (DEBUG) say why
    waited = "request 1 /v1/completions tenant=- model=<base> replica=r0 status=client_closed "
    assert any(
        m.startswith(waited) and m.endswith(" (the client went away while waiting for the answer)")
        for m in logs
    ), logs
    left = "request 2 /v1/completions tenant=- model=<base> replica=r1 status=client_closed "
    assert any(
        m.startswith(left) and " (the client went away while streaming (after " in m for m in logs
    ), logs


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", [b"text/event-stream\rX-Injected: 1", b"application/json\x00"])
async def test_a_content_type_that_cannot_be_relayed_is_a_502_not_a_broken_answer(
    replicas: list[ScriptedReplica], stream: bool, bad: bytes
) -> None:
    """The gateway relays the replica's Content-Type: one with a control character (a bare CR
    would inject a header) is a broken answer, refused before anything reached the client
    (before: the client's connection was dropped, or it got a body without a status line)."""
    rep = replicas[0]
    body = b'data: {"x": 1}\n\n' if stream else b'{"x": 1}'
    rep.raw_answer = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        bad,
        len(body),
        body,
    )
    async with (
        running_gateway(gateway_config([rep.url]), port=0) as gw,
        aiohttp.ClientSession() as http,
    ):
        body_json = {"prompt": "p", "stream": stream}
        async with http.post(gw.url + "/v1/completions", json=body_json) as resp:
            assert resp.status == 502
            assert resp.headers.get(REPLICA_HEADER) == "r0"
            error = (await resp.json())["error"]
            assert error["type"] == "upstream_error"
            assert error["message"].startswith("replica r0: bad response head: control character")
        assert _count(gw, "r0", "502") == 1
        assert "X-Injected" not in resp.headers


async def test_a_client_that_goes_away_while_sending_its_body_is_counted(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    async with running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw:
        _, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        await writer.drain()
        await wait_until(lambda: gw.gateway.proxy.in_flight == 1, "the body read to begin")
        writer.close()  # gone, 89 bytes short
        await wait_until(lambda: gw.gateway.proxy.in_flight == 0, "the handler to end")
        assert _count(gw, "", "client_closed") == 1
    assert any(
        m.startswith("request 1 /v1/completions tenant=- model=- replica=- ")
        and " status=client_closed " in m
        and m.endswith(" (the client went away before it was routed)")
        for m in _proxy_logs(caplog)
    ), _proxy_logs(caplog)
    assert not [r for rep in replicas for r in rep.requests]
