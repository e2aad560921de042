"""Graceful shutdown, as Kubernetes (SIGTERM, then SIGKILL after the grace period) and load
balancers expect it: new connections are refused at once, idle keep-alive connections close,
requests in flight may finish within the drain period (``server.shutdown_timeout_s``), and
those still running at its end get an answer (a 503, or a final SSE error event the ``openai``
SDK raises as ``APIError``) while their upstream connections are closed. Real loopback sockets;
waits are bounded only as hang guards."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    gateway_in_background,
    openai_client,
    serve_process,
    wait_until,
)

from loragate.core.config import config_from_mapping
from loragate.core.errors import ConfigError

RUNNER_LOG = "loragate.gateway.runner"


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.name == RUNNER_LOG)


async def _refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _start_held_requests(
    rep: ScriptedReplica, client: openai.AsyncOpenAI
) -> tuple[Any, str, asyncio.Task[Any]]:
    """A stream held after its first event and a non-streaming request held at the replica:
    (the stream's iterator, its first text, the non-streaming request's task)."""
    rep.stream_gate = asyncio.Event()
    rep.answer_gate = asyncio.Event()
    stream = await client.completions.create(model=BASE, prompt="s", stream=True)
    events = stream.__aiter__()
    first = (await events.__anext__()).choices[0].text
    plain = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
    await wait_until(lambda: len(rep.requests) == 2, "both requests to reach the replica")
    return events, first, plain


async def _read_rest(events: Any) -> list[str]:
    return [chunk.choices[0].text async for chunk in events]


async def test_requests_running_at_the_deadline_are_answered_and_aborted_upstream(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    rep = replicas[0]
    config = gateway_config([rep.url])
    async with (
        gateway_in_background(config, shutdown_timeout_s=0.2) as (gw, stop, shutdown),
        openai_client(gw.url) as client,
    ):
        events, first, plain = await _start_held_requests(rep, client)
        assert first == " one"
        stop.set()
        # The stream ends with the gateway's SSE error event (not a dropped connection).
        with pytest.raises(openai.APIError) as streamed:
            await asyncio.wait_for(_read_rest(events), timeout=30)
        assert not isinstance(streamed.value, openai.APIConnectionError)
        assert streamed.value.body == {
            "message": "the gateway is shutting down and the request did not finish within "
            "its drain period; retry it",
            "type": "service_unavailable",
            "param": None,
            "code": "shutting_down",
        }
        # The non-streaming request gets a 503 in the OpenAI error shape.
        with pytest.raises(openai.APIStatusError) as answered:
            await asyncio.wait_for(plain, timeout=30)
        assert answered.value.status_code == 503
        error = answered.value.response.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "shutting_down"
        assert "shutting down" in error["message"]
        assert answered.value.response.headers["connection"] == "close"
        await asyncio.wait_for(shutdown, timeout=30)  # the shutdown ends (hang guard)
        # Both upstream connections were closed: the replica saw both requests go away.
        await wait_until(lambda: rep.cancelled == 2, "the replica to see both requests abort")
    assert gw.gateway.proxy.in_flight == 0
    assert not any(gw.gateway.inflight.counts().values())
    assert _logged(caplog, "2 requests in flight, waiting up to 0.2 s")
    assert _logged(caplog, "0 requests finished during the drain, 2 cut at its end")


async def test_requests_that_finish_within_the_drain_period_complete_normally(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    rep = replicas[0]
    config = gateway_config([rep.url])
    async with (
        gateway_in_background(config, shutdown_timeout_s=600) as (gw, stop, shutdown),
        openai_client(gw.url) as client,
    ):
        # An idle keep-alive connection (one request answered on it).
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        events, first, plain = await _start_held_requests(rep, client)
        stop.set()
        await wait_until(lambda: _logged(caplog, "waiting up to 600 s"), "the drain to begin")
        assert _logged(caplog, "2 requests in flight")
        # New connections are refused once the shutdown began.
        assert await _refused(gw.host, gw.port)
        # The idle keep-alive connection is closed by the gateway (after the answer's body).
        rest_of_connection = await asyncio.wait_for(reader.read(), timeout=30)
        assert b'"status"' in rest_of_connection
        assert reader.at_eof()
        writer.close()
        assert not shutdown.done()  # still draining: both requests are held
        rep.stream_gate.set()  # type: ignore[union-attr]
        rep.answer_gate.set()  # type: ignore[union-attr]
        # Both finish normally, although the shutdown began before they did.
        assert [first, *await asyncio.wait_for(_read_rest(events), timeout=30)] == [
            " one",
            " two",
            " three",
        ]
        result = await asyncio.wait_for(plain, timeout=30)
        assert result.choices[0].text == "hi from r0"
        # The shutdown then ends without waiting for the rest of the drain period.
        await asyncio.wait_for(shutdown, timeout=30)
    assert rep.cancelled == 0
    assert _logged(caplog, "2 requests finished during the drain, 0 cut at its end")


async def test_answers_finished_during_the_drain_say_connection_close(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    """The connection closes after such an answer: a keep-alive client that reused it for its
    next request would lose that request, so the answer must say so."""
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    rep = replicas[0]
    rep.answer_gate = asyncio.Event()
    config = gateway_config([rep.url])
    async with (
        gateway_in_background(config, shutdown_timeout_s=600) as (gw, stop, _),
        aiohttp.ClientSession() as http,
    ):
        before = await http.get(gw.url + "/health")  # answered before the shutdown
        assert before.headers.get("Connection", "").lower() != "close"
        before.release()
        held = asyncio.create_task(
            http.post(gw.url + "/v1/completions", json={"model": BASE, "prompt": "p"})
        )
        await wait_until(lambda: len(rep.requests) == 1, "the request to reach the replica")
        stop.set()
        await wait_until(lambda: _logged(caplog, "waiting up to 600 s"), "the drain")
        rep.answer_gate.set()
        resp = await asyncio.wait_for(held, timeout=30)
        assert resp.status == 200
        assert resp.headers["Connection"].lower() == "close"
        assert (await resp.json())["choices"][0]["text"] == "hi from r0"


def _config_file(tmp_path: Path, rep: ScriptedReplica, *, drain_s: float) -> Path:
    """A ``loragate serve`` config with one replica and a drain period of ``drain_s``."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"base_model: {BASE}\nreplicas: ['{rep.url}']\nserver: {{shutdown_timeout_s: {drain_s}}}\n",
        encoding="utf-8",
    )
    return path


async def test_sigterm_drains_then_answers_and_exits_0(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    rep = replicas[0]
    async with (
        serve_process(_config_file(tmp_path, rep, drain_s=0.3)) as serve,
        openai_client(serve.url) as client,
    ):
        events, _, plain = await _start_held_requests(rep, client)
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"SIGTERM: shutting down")
        await serve.wait_for_log(r"2 requests in flight, waiting up to 0\.3 s")
        with pytest.raises(openai.APIError) as streamed:
            await asyncio.wait_for(_read_rest(events), timeout=30)
        assert not isinstance(streamed.value, openai.APIConnectionError)
        assert streamed.value.body["code"] == "shutting_down"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as answered:
            await asyncio.wait_for(plain, timeout=30)
        assert answered.value.status_code == 503
        await serve.wait_for_log(r"0 requests finished during the drain, 2 cut at its end")
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0
    await wait_until(lambda: rep.cancelled == 2, "the replica to see both requests abort")


async def test_a_second_sigterm_cuts_the_drain_short(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    rep = replicas[0]
    async with (
        serve_process(_config_file(tmp_path, rep, drain_s=600)) as serve,
        openai_client(serve.url) as client,
    ):
        events, _, plain = await _start_held_requests(rep, client)
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"2 requests in flight, waiting up to 600 s")
        serve.proc.send_signal(signal.SIGTERM)
        await serve.wait_for_log(r"SIGTERM again: cutting the requests still running now")
        with pytest.raises(openai.APIError) as streamed:
            await asyncio.wait_for(_read_rest(events), timeout=30)
        assert streamed.value.body["code"] == "shutting_down"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as answered:
            await asyncio.wait_for(plain, timeout=30)
        assert answered.value.status_code == 503
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


def test_shutdown_timeout_is_a_validated_server_key() -> None:
    base: dict[str, Any] = {"base_model": "m", "replicas": ["http://127.0.0.1:1"]}
    assert config_from_mapping(base).server.shutdown_timeout_s == 25.0  # < Kubernetes' 30 s
    config = config_from_mapping({**base, "server": {"shutdown_timeout_s": 5}})
    assert config.server.shutdown_timeout_s == 5.0
    for bad in (0, -1, "10s", True):
        with pytest.raises(ConfigError, match=r"server\.shutdown_timeout_s"):
            config_from_mapping({**base, "server": {"shutdown_timeout_s": bad}})


@pytest.mark.parametrize(("n", "text"), [(0, "0 requests"), (1, "1 request"), (2, "2 requests")])
def test_shutdown_log_counts_requests_in_words(n: int, text: str) -> None:
    from loragate.gateway.runner import _requests

    assert _requests(n) == text
