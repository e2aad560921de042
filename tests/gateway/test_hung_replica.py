"""Requests in progress on a replica that stopped answering: its process alive, its sockets open,
but nothing more comes (the vLLM process SIGSTOPped, its engine wedged). Before, its polls timed
out and it left rotation, but a stream that had sent output waited
``limits.stream_read_timeout_s`` of silence for its error event, and a request with nothing sent
``limits.request_timeout_s``. Now, once its polls timed out ``poller.timeouts_to_unhealthy`` times
in a row, its requests are watched: if none of them receives a byte for
``limits.stopped_replica_grace_s``, each fails as on a replica that stopped listening (a stream
that sent output ends with an error event; a request with nothing sent is retried once on another
replica, ``engine_stopped``). A replica whose polls time out but that still sends (only slow)
keeps every request, even one silent meanwhile.

The hung replicas are ``loragate replica --simulated`` processes, SIGSTOPped; the slow one a
scripted replica on loopback whose ``/health`` stalls. Timeouts are set far above the bounds the
tests wait (``stream_read_timeout_s``/``request_timeout_s`` 120 s, the openai client's 30 s), so
the old behaviour fails them; no timing is asserted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from chaos_replicas import SimReplica
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    serving,
    wait_until,
)
from metric_counts import counts

from loragate.gateway import running_gateway

_LIMITS = {"stopped_replica_grace_s": 1.0, "request_timeout_s": 120, "stream_read_timeout_s": 120}
# Polls every 0.2 s that time out after 1 s: a stopped replica is out after two (~2.4 s).
_POLLER = {"interval_s": 0.2, "timeout_s": 1.0}
_BOUND_S = 30.0  # the longest a test waits for an answer (a hang guard, not a timing assertion)


@contextlib.asynccontextmanager
async def _replicas(tmp_path: Path, *time_scales: float) -> AsyncIterator[list[SimReplica]]:
    """Simulated replica processes r0, r1, ... (``time_scale`` 0.05: ~60 ms per token);
    a stopped one is continued before it is killed."""
    reps = [
        SimReplica(f"r{i}", tmp_path, seed=i, time_scale=scale)
        for i, scale in enumerate(time_scales)
    ]
    try:
        for rep in reps:
            await rep.start()
        yield reps
    finally:
        for rep in reps:
            if rep.proc is not None and rep.proc.returncode is None:
                rep.proc.send_signal(signal.SIGCONT)
            await rep.stop()


def _stop(rep: SimReplica) -> None:
    assert rep.proc is not None
    rep.proc.send_signal(signal.SIGSTOP)


async def _running(http: aiohttp.ClientSession, rep: SimReplica) -> bool:
    """Whether the replica is running a request (its vLLM gauge)."""
    async with http.get(rep.url + "/metrics") as resp:
        text = await resp.text()
    return any(
        line.startswith("vllm:num_requests_running") and float(line.rsplit(" ", 1)[1]) > 0
        for line in text.splitlines()
    )


async def test_a_stream_that_sent_output_ends_soon_after_its_replica_hangs(
    tmp_path: Path,
) -> None:
    async with _replicas(tmp_path, 0.05) as (hung,):
        cfg = gateway_config([hung.url], poller=_POLLER, limits=_LIMITS)
        async with (
            running_gateway(cfg, port=0) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            answer = await client.completions.create(
                model=BASE, prompt="p", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
            )
            first = await answer.__anext__()
            _stop(hung)  # alive, its sockets open, silent from now on

            async def rest() -> BaseException | None:
                try:
                    async for _ in answer:
                        pass
                except openai.APIError as exc:
                    return exc
                return None

            error = await asyncio.wait_for(rest(), _BOUND_S)
            requests = await counts(http, gw.url, "loragate_requests_total")
            healthy = gw.gateway.pool.is_healthy("r0")
    assert first.choices[0].text
    assert error is not None, "the stream ended without an error event"
    assert "replica r0" in str(error) and "stopped answering" in str(error), error
    assert requests == {("r0", "stream_error"): 1}
    assert not healthy


async def test_a_request_with_nothing_sent_is_retried_on_another_replica(
    tmp_path: Path,
) -> None:
    # r0 slow (~60 ms per token: still generating when stopped), r1 at full speed.
    async with (
        _replicas(tmp_path, 0.05, 1.0) as (hung, other),
        aiohttp.ClientSession() as http,
    ):
        cfg = gateway_config(
            [hung.url, other.url], routing="round_robin", poller=_POLLER, limits=_LIMITS
        )
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            task = asyncio.create_task(
                client.completions.with_raw_response.create(  # round robin: r0
                    model=BASE, prompt="p", max_tokens=300, extra_body={"ignore_eos": True}
                )
            )
            for _ in range(int(_BOUND_S / 0.05)):
                if await _running(http, hung):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("r0 never ran the request")
            _stop(hung)
            raw = await asyncio.wait_for(task, _BOUND_S)
            requests = await counts(http, gw.url, "loragate_requests_total")
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert raw.parse().usage.completion_tokens == 300
    assert requests == {("r1", "200"): 1}
    assert retries == {("r0", "engine_stopped"): 1}


class _SlowReplica(ScriptedReplica):
    """Only slow: its ``/health`` does not answer while ``answers`` is clear (its polls time out),
    and a stream sends a token every 50 ms until ``finish`` is set; a non-streaming answer
    waits for ``finish`` (silent meanwhile)."""

    def __init__(self) -> None:
        super().__init__("r0")
        self.answers = asyncio.Event()
        self.answers.set()
        self.finish = asyncio.Event()

    async def _health(self, request: web.Request) -> web.Response:
        await self.answers.wait()
        return await super()._health(request)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not body.get("stream"):
            await self.finish.wait()
            return web.json_response(
                {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
                 "choices": [{"index": 0, "text": "late", "finish_reason": "length"}]}
            )  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        while not self.finish.is_set() or sent == 0:
            event = {"id": "cmpl-2", "object": "text_completion", "created": 1, "model": BASE,
                     "choices": [{"index": 0, "text": " t", "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            sent += 1
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def test_a_slow_replica_whose_polls_time_out_keeps_its_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="loragate.backends.pool")
    slow = _SlowReplica()
    # Polls time out after 0.5 s; the replica's stream sends every 50 ms, its other request
    # is silent until the end: the replica as a whole is heard, so neither is cut.
    poller = {"interval_s": 0.1, "timeout_s": 0.5}
    limits = {**_LIMITS, "stopped_replica_grace_s": 0.5}
    async with serving(slow.app) as (url, _):
        cfg = gateway_config([url], poller=poller, limits=limits)
        async with (
            running_gateway(cfg, port=0) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            stream = await client.completions.create(
                model=BASE, prompt="p", max_tokens=5, stream=True
            )
            first = await stream.__anext__()
            silent = asyncio.create_task(
                client.completions.create(model=BASE, prompt="p", max_tokens=5)
            )
            await wait_until(lambda: len(slow.requests) == 2, "r0 got both requests")
            slow.answers.clear()
            # Out of rotation for its polls, and its requests watched, then spared: twice.
            await wait_until(lambda: not gw.gateway.pool.is_healthy("r0"), "r0 out of rotation")
            await wait_until(lambda: len(_levels(caplog, _SPARED)) >= 2, "two watches sparing r0")
            slow.finish.set()
            slow.answers.set()

            async def rest() -> list[str]:
                return [c.text async for chunk in stream for c in chunk.choices]

            texts = await asyncio.wait_for(rest(), _BOUND_S)
            late = await asyncio.wait_for(silent, _BOUND_S)
            requests = await counts(http, gw.url, "loragate_requests_total")
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert first.choices[0].text == " t" and texts and set(texts) == {" t"}
    assert late.choices[0].text == "late"
    assert requests == {("r0", "200"): 2}
    assert retries == {} and slow.cancelled == 0
    # Said once (a slow replica is watched at every poll that times out), then at DEBUG.
    assert _levels(caplog, _WATCHED)[:2] == ["WARNING", "DEBUG"]
    assert _levels(caplog, _SPARED)[:2] == ["INFO", "DEBUG"]


_WATCHED = "request(s) in progress there fail if none of them receives anything"
_SPARED = "still sends on its connections"


def _levels(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The levels of the pool's log records saying ``text``, in order."""
    return [r.levelname for r in caplog.records if text in r.getMessage()]


class _HangingReplica(ScriptedReplica):
    """Hangs in-process: completions never answer (``mode = "hang"``), nor do adapter loads,
    nor (once ``answers`` is cleared) ``/health``."""

    def __init__(self) -> None:
        super().__init__("r0")
        self.mode = "hang"
        self.answers = asyncio.Event()
        self.answers.set()
        self.loads_started = 0

    async def _health(self, request: web.Request) -> web.Response:
        await self.answers.wait()
        return await super()._health(request)

    async def _load(self, request: web.Request) -> web.Response:
        self.loads_started += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_request_waiting_for_an_adapter_load_there_stops_waiting_too() -> None:
    hung = _HangingReplica()
    # admin_timeout_s far above the bound: before, the load wait ended only with the load.
    limits = {**_LIMITS, "stopped_replica_grace_s": 0.5, "admin_timeout_s": 120}
    async with serving(hung.app) as (url, _):
        cfg = gateway_config([url], poller={"interval_s": 0.1, "timeout_s": 0.5}, limits=limits)
        async with (
            running_gateway(cfg, port=0) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            base = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
            await wait_until(lambda: hung.requests, "r0 got the base model's request")
            loading = asyncio.create_task(client.completions.create(model="lora-0", prompt="p"))
            await wait_until(lambda: hung.loads_started, "r0 began loading lora-0")
            hung.answers.clear()  # its polls time out from now on
            errors = []
            for task in (base, loading):
                with pytest.raises(openai.APIStatusError) as caught:
                    await asyncio.wait_for(task, _BOUND_S)
                errors.append(caught.value)
            async with http.get(gw.url + "/metrics") as resp:
                metrics = await resp.text()
    assert [e.status_code for e in errors] == [502, 502]
    assert all(e.response.headers["X-Loragate-Replica"] == "r0" for e in errors)
    assert "replica r0: stopped answering" in errors[0].message
    assert "replica r0: stopped answering" in errors[1].message
    assert "while adapter 'lora-0' was loading there" in errors[1].message
    for adapter in ("", "lora-0"):
        assert f'requests_total{{adapter="{adapter}",replica="r0",status="502"}} 1.0' in metrics


_NOTHING_JUDGED = "none of the requests watched there was left to fail"


async def test_a_watch_with_no_request_left_to_fail_leaves_the_load_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A watch wakes the requests waiting for adapter loads only if it failed requests: one
    whose watched requests all ended meanwhile (their clients left) judged nothing. Before, it
    woke them (a 502) on the silence of a request that was no longer there."""
    caplog.set_level(logging.DEBUG, logger="loragate.backends.pool")
    hung = _HangingReplica()
    # A grace long enough for the client to leave once the watch began (the WARNING line).
    limits = {**_LIMITS, "stopped_replica_grace_s": 2.0, "admin_timeout_s": 120}
    async with serving(hung.app) as (url, _):
        cfg = gateway_config([url], poller={"interval_s": 0.1, "timeout_s": 0.5}, limits=limits)
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            base = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
            await wait_until(lambda: hung.requests, "r0 got the base model's request")
            loading = asyncio.create_task(client.completions.create(model="lora-0", prompt="p"))
            await wait_until(lambda: hung.loads_started, "r0 began loading lora-0")
            hung.answers.clear()  # its polls time out from now on
            await wait_until(lambda: _levels(caplog, _WATCHED), "the watch of r0 began")
            base.cancel()  # its client leaves: the request ends, nothing failed
            with contextlib.suppress(asyncio.CancelledError):
                await base
            await wait_until(
                lambda: loading.done() or _levels(caplog, _NOTHING_JUDGED), "the watch ended"
            )
            assert not loading.done()  # before: woken with a 502
            assert _levels(caplog, _NOTHING_JUDGED)[:1] == ["DEBUG"]
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            hung.answers.set()
