"""Requests waiting for an on-demand adapter load on a replica that goes away meanwhile.

A replica that stops listening (vLLM closes its listener at once on SIGTERM, and may then wait
for its open connections to close before it exits) may never answer the load it was given.
The requests waiting for that load used to wait for ``limits.admin_timeout_s`` /
``request_timeout_s`` (here 3600 s: the openai client's own 30 s ends the test first). Now the
poll that finds the listener closed wakes them: each is retried once on another replica
(``load_failed``), else the client gets a 502 naming the replica; the load's connection is
closed (so vLLM can exit).

A config reload that removes or replaces the replica's entry while a request waits for a load
there routes the request again at once (counted ``reload``; its one retry stays unused), where
it used to wait for the load and then go to the entry the reload had retired.

Scripted replicas on loopback (the admin load held open until released, the listener closed
as uvicorn closes it on SIGTERM), the gateway in-process, the openai SDK as client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
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

from loragate.gateway import load_config, running_gateway

# The old code waited for these: far past the openai client's 30 s.
_LIMITS = {"request_timeout_s": 3600, "admin_timeout_s": 3600, "stopped_replica_grace_s": 0.2}
TOKEN = "load-wait-token"


class HeldLoads(StopsListening):
    """A scripted replica whose adapter loads wait for ``load_gate`` (when set), and that can
    stop listening (``StopsListening``); the connections with a load in progress stay open."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load_gate: asyncio.Event | None = None
        self.loads_begun = 0
        self.loads_cancelled = 0  # loads whose client (the gateway) closed the connection
        self.auth: list[str | None] = []  # the Authorization header of each completion

    async def _load(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.busy.add(request.transport)
        self.loads_begun += 1
        try:
            if self.load_gate is not None:
                await self.load_gate.wait()
            return await super()._load(request)
        except asyncio.CancelledError:
            self.loads_cancelled += 1
            raise
        finally:
            self.busy.discard(request.transport)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization"))
        return await super()._completions(request)


@pytest.fixture
async def replicas() -> AsyncIterator[list[HeldLoads]]:
    """r0, r1, r2 on loopback."""
    async with serving_replicas(HeldLoads, 3) as out:
        yield out


def _request(client: openai.AsyncOpenAI, stream: bool = False) -> asyncio.Task[Any]:
    return asyncio.create_task(
        client.completions.with_raw_response.create(
            model="lora-0", prompt="p", max_tokens=3, stream=stream
        )
    )


async def _text(raw: Any, stream: bool) -> str:
    answer = raw.parse()
    if not stream:
        return str(answer.choices[0].text)
    return "".join([c.choices[0].text async for c in answer if c.choices])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_waiting_for_a_load_on_a_stopped_replica_is_retried_elsewhere(
    replicas: list[HeldLoads], stream: bool
) -> None:
    stopped, other = replicas[0], replicas[1]
    stopped.load_gate = asyncio.Event()  # the load is never answered
    cfg = gateway_config([stopped.url, other.url], routing="round_robin", limits=_LIMITS)
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client, stream)  # round robin: r0
        await wait_until(lambda: stopped.loads_begun, "r0 got the load")
        await stopped.stop_listening()
        await gw.gateway.pool.poll_once()  # refused: r0 stopped listening
        raw = await task
        text = await _text(raw, stream)
        # The load's connection is closed: a vLLM waiting for its connections can exit.
        await wait_until(lambda: stopped.loads_cancelled, "r0's load connection closed")
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        assert gw.gateway.pool.loading("r0") == frozenset()  # a later request loads anew
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert text.strip()
    assert other.load_calls == 1 and len(other.requests) == 1 and not stopped.requests
    assert requests == {("r1", "200"): 1}
    assert retries == {("r0", "load_failed"): 1}


async def test_a_connection_refused_there_wakes_the_load_waiters_before_any_poll(
    replicas: list[HeldLoads],
) -> None:
    """Another request that finds r0's port closed tells the pool as a refused poll would."""
    stopped, other = replicas[0], replicas[1]
    stopped.load_gate = asyncio.Event()
    cfg = gateway_config([stopped.url, other.url], routing="round_robin", limits=_LIMITS)
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        waiting = _request(client)  # round robin: r0, where it waits for the load
        await wait_until(lambda: stopped.loads_begun, "r0 got the load")
        first = await client.completions.create(model=BASE, prompt="p", max_tokens=1)  # r1
        await stopped.stop_listening()
        # Round robin: r0, refused at connect, retried on r1; no poll ran since the start.
        refused = await client.completions.with_raw_response.create(
            model=BASE, prompt="p", max_tokens=1
        )
        raw = await waiting
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert first.choices[0].text == "hi from r1"
    assert refused.headers["X-Loragate-Replica"] == "r1"
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert raw.parse().choices[0].text == "hi from r1"
    assert retries == {("r0", "connect"): 1, ("r0", "load_failed"): 1}


async def test_without_another_replica_the_client_gets_a_502_naming_the_stopped_one(
    replicas: list[HeldLoads],
) -> None:
    stopped = replicas[0]
    stopped.load_gate = asyncio.Event()
    cfg = gateway_config([stopped.url], limits=_LIMITS)
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client)
        await wait_until(lambda: stopped.loads_begun, "r0 got the load")
        await stopped.stop_listening()
        await gw.gateway.pool.poll_once()
        with pytest.raises(openai.APIStatusError) as caught:
            await task
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert caught.value.status_code == 502
    assert caught.value.response.headers["X-Loragate-Replica"] == "r0"
    error = caught.value.response.json()["error"]
    assert error["message"] == (
        "replica r0: stopped listening (its poll could not connect) while adapter 'lora-0' "
        "was loading there"
    )
    assert error["code"] == "upstream_unavailable"
    assert requests == {("r0", "502"): 1}


async def test_a_replica_still_listening_keeps_its_load_waiters(
    replicas: list[HeldLoads],
) -> None:
    """The control: a replica whose polls succeed is only slow; its load is awaited."""
    slow = replicas[0]
    slow.load_gate = asyncio.Event()
    cfg = gateway_config([slow.url, replicas[1].url], routing="round_robin", limits=_LIMITS)
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client)
        await wait_until(lambda: slow.loads_begun, "r0 got the load")
        await gw.gateway.pool.poll_once()  # answered
        assert not task.done()
        slow.load_gate.set()
        raw = await task
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r0"
    assert retries == {} and slow.loads_cancelled == 0


def _write(path: Path, *entries: dict[str, Any]) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": list(entries),
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "routing": "round_robin",
        "limits": _LIMITS,
        "poller": {"interval_s": 3600},  # polls happen when a test or a reload says
        "admin": {"token": TOKEN},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _reload(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(
        url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def test_a_reload_removing_the_replica_routes_its_load_waiters_again(
    replicas: list[HeldLoads], tmp_path: Path
) -> None:
    removed, other = replicas[0], replicas[1]
    removed.load_gate = asyncio.Event()
    r0, r1 = {"id": "r0", "url": removed.url}, {"id": "r1", "url": other.url}
    path = _write(tmp_path / "gw.yaml", r0, r1)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client)  # round robin: r0
        await wait_until(lambda: removed.loads_begun, "r0 got the load")
        _write(path, r1)
        assert (await _reload(http, gw.url))["replicas_removed"] == ["r0"]
        raw = await task
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert raw.parse().choices[0].text == "hi from r1"
    assert requests == {("r1", "200"): 1}
    assert retries == {("r0", "reload"): 1}
    assert not removed.requests


async def test_a_reload_moving_the_replica_elsewhere_routes_its_load_waiters_there(
    replicas: list[HeldLoads], tmp_path: Path
) -> None:
    """r0's entry gets another URL: the request waiting for the load at the old one goes to
    the new one, which loads the adapter itself (the only replica: no retry was needed)."""
    old, new = replicas[0], replicas[2]
    old.load_gate = asyncio.Event()
    path = _write(tmp_path / "gw.yaml", {"id": "r0", "url": old.url})
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client)
        await wait_until(lambda: old.loads_begun, "the old r0 got the load")
        _write(path, {"id": "r0", "url": new.url})
        assert (await _reload(http, gw.url))["replicas_changed"] == ["r0"]
        raw = await task
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r0"
    assert raw.parse().choices[0].text == "hi from r2"
    assert new.load_calls == 1 and not old.requests
    assert requests == {("r0", "200"): 1}
    assert retries == {("r0", "reload"): 1}


async def test_a_reload_changing_the_replicas_key_sends_its_load_waiters_with_the_new_one(
    replicas: list[HeldLoads], tmp_path: Path
) -> None:
    """The same server under a new key: the request is routed again, waits for the same load
    (one load call), and goes out with the new entry's key, not the retired entry's."""
    rep = replicas[0]
    rep.load_gate = asyncio.Event()
    path = _write(tmp_path / "gw.yaml", {"id": "r0", "url": rep.url})
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        task = _request(client)
        await wait_until(lambda: rep.loads_begun, "r0 got the load")
        _write(path, {"id": "r0", "url": rep.url, "api_key": "k2"})
        assert (await _reload(http, gw.url))["replicas_changed"] == ["r0"]
        rep.load_gate.set()
        raw = await task
        requests = await counts(http, gw.url, "loragate_requests_total")
    assert raw.headers["X-Loragate-Replica"] == "r0"
    assert raw.parse().choices[0].text == "hi from r0"
    assert rep.loads_begun == 1
    assert rep.auth == ["Bearer k2"]
    assert requests == {("r0", "200"): 1}
