"""Requests in progress on a replica that stopped listening. vLLM closes its listener at once on
SIGTERM; if its engine dies before its abort answers get out (``--shutdown-timeout 0`` lost the
race on real vLLM 0.32), the requests it holds get nothing more, and vLLM waits for their
connections to close before it exits. Before, the gateway's poll marked the replica unhealthy
but its requests kept waiting up to ``limits.stream_read_timeout_s`` / ``request_timeout_s``.
Now a poll refused at connect wakes them: one silent for ``limits.stopped_replica_grace_s`` is
retried on another replica if nothing of it reached the client (``engine_stopped``), else the
client gets a 502 or, in a stream that had sent output, an error event; its upstream
connection is closed. A replica that is only slow (its polls succeed) keeps its requests.

The stopped replica here is a scripted replica holding its answer whose listening socket is
closed while its connections stay open (its aiohttp site stopped)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from gateway_harness import (
    BASE,
    StopsListening,
    gateway_config,
    openai_client,
    serving_replicas,
    wait_until,
)
from metric_counts import counts

from loragate.gateway import running_gateway

_GRACE = {"stopped_replica_grace_s": 0.2, "request_timeout_s": 120, "stream_read_timeout_s": 120}


class StoppingReplica(StopsListening):
    """A scripted replica that can stop listening (``StopsListening``); the connections with a
    request in progress stay open."""

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.busy.add(request.transport)
        try:
            return await super()._completions(request)
        finally:
            self.busy.discard(request.transport)


@pytest.fixture
async def replicas() -> AsyncIterator[list[StoppingReplica]]:
    """r0 and r1 (the conftest's scripted replicas, able to stop listening)."""
    async with serving_replicas(StoppingReplica) as out:
        yield out


async def _collect(stream: Any) -> tuple[list[str], BaseException | None]:
    """A stream's texts until it ends or the SDK raises (an error event)."""
    texts: list[str] = []
    try:
        async for chunk in stream:
            texts.extend(c.text for c in chunk.choices)
    except openai.APIError as exc:
        return texts, exc
    return texts, None


def _config(replicas: list[StoppingReplica]) -> Any:
    return gateway_config([r.url for r in replicas], routing="round_robin", limits=_GRACE)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_with_no_answer_yet_is_retried_on_another_replica(
    replicas: list[StoppingReplica], stream: bool
) -> None:
    stopped, other = replicas
    # Holds a non-streaming answer; a stream after its head (held: nothing reached the client).
    stopped.answer_gate = stopped.head_gate = asyncio.Event()
    async with (
        running_gateway(_config(replicas), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = asyncio.create_task(
            client.completions.with_raw_response.create(  # round robin: r0
                model=BASE, prompt="p", max_tokens=3, stream=stream
            )
        )
        await wait_until(lambda: stopped.requests, "r0 got the request")
        await stopped.stop_listening()
        await gw.gateway.pool.poll_once()  # refused: r0 stopped listening
        raw = await task
        answer = raw.parse()
        texts, error = (await _collect(answer)) if stream else ([answer.choices[0].text], None)
        await wait_until(lambda: stopped.cancelled, "r0's connection closed")
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert error is None and "".join(texts).strip()
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert len(other.requests) == 1
    assert requests == {("r1", "200"): 1}
    assert retries == {("r0", "engine_stopped"): 1}


async def test_without_another_replica_the_client_gets_a_502_naming_it(
    replicas: list[StoppingReplica],
) -> None:
    stopped = replicas[0]
    stopped.answer_gate = asyncio.Event()
    cfg = gateway_config([stopped.url], limits=_GRACE)
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = asyncio.create_task(client.completions.create(model=BASE, prompt="p", max_tokens=3))
        await wait_until(lambda: stopped.requests, "r0 got the request")
        await stopped.stop_listening()
        await gw.gateway.pool.poll_once()
        with pytest.raises(openai.APIStatusError) as caught:
            await task
        await wait_until(lambda: stopped.cancelled, "r0's connection closed")
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert caught.value.status_code == 502
    assert caught.value.response.headers["X-Loragate-Replica"] == "r0"
    assert "replica r0: stopped listening" in caught.value.message
    assert requests == {("r0", "502"): 1}


async def test_a_stream_that_sent_output_ends_with_an_error_event(
    replicas: list[StoppingReplica],
) -> None:
    stopped = replicas[0]
    stopped.stream_gate = asyncio.Event()  # holds the stream after its first token
    async with (
        running_gateway(_config(replicas), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        answer = await client.completions.create(  # round robin: r0
            model=BASE, prompt="p", max_tokens=3, stream=True
        )
        first = await answer.__anext__()
        await stopped.stop_listening()
        await gw.gateway.pool.poll_once()
        texts, error = await _collect(answer)
        await wait_until(lambda: stopped.cancelled, "r0's connection closed")
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert [c.text for c in first.choices] == [" one"] and texts == []
    assert error is not None and "replica r0 broke off the stream: stopped listening" in str(error)
    assert requests == {("r0", "stream_error"): 1}
    assert retries == {}


async def test_a_slow_replica_whose_polls_succeed_keeps_its_requests(
    replicas: list[StoppingReplica],
) -> None:
    slow = replicas[0]
    slow.answer_gate = asyncio.Event()
    async with (
        running_gateway(_config(replicas), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = asyncio.create_task(
            client.completions.with_raw_response.create(model=BASE, prompt="p", max_tokens=3)
        )
        await wait_until(lambda: slow.requests, "r0 got the request")
        await gw.gateway.pool.poll_once()  # answered: r0 is only slow
        await asyncio.sleep(1.0)  # five graces: a request woken would have been retried
        slow.answer_gate.set()
        raw = await task
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r0" and raw.parse().choices
    assert retries == {} and not slow.cancelled
