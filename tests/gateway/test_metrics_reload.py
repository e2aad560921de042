"""``/metrics`` across config reloads (``POST /admin/reload``, SIGHUP), scraped over loopback:
counters never go backwards for the replicas that stay, whether a reload keeps them as they
are or replaces them (URL, key or settings changed); a removed replica's counters keep their
last value while its gauges go away; in-flight gauges neither leak nor go negative when a
replica is replaced with requests on it, and a request waiting for an adapter load there is
answered (and the replacement, at the same URL, knows of that load); a removed replica stays
in the in-flight gauges while requests still run on it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from gateway_harness import (
    BASE,
    PickyReplica,
    ScriptedReplica,
    openai_client,
    serve_process,
    serving,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from loragate.gateway import load_config, running_gateway
from redis_fixture import RedisServer

TOKEN = "reload-metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOADS = "loragate_adapter_loads_total"
IN_FLIGHT = "loragate_in_flight_requests"
SHARED_IN_FLIGHT = "loragate_shared_in_flight_requests"
Series = tuple[str, tuple[tuple[str, str], ...]]


class GatedReplica(ScriptedReplica):
    """Holds every adapter load at ``load_gate`` (while it is set to an unset event)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load_gate: asyncio.Event | None = None
        self.loads_started = 0

    async def _load(self, request: web.Request) -> web.Response:
        self.loads_started += 1
        if self.load_gate is not None:
            await self.load_gate.wait()
        return await super()._load(request)


class RecordingReplica(ScriptedReplica):
    """Keeps the server side of every connection a completion came on."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.transports: list[asyncio.BaseTransport] = []

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        self.transports.append(request.transport)
        return await super()._completions(request)


@contextlib.asynccontextmanager
async def _two(r1: ScriptedReplica) -> AsyncIterator[list[ScriptedReplica]]:
    """r0 (a gated replica, ungated) and ``r1``, serving on loopback."""
    r0 = GatedReplica("r0")
    async with serving(r0.app) as (u0, _), serving(r1.app) as (u1, _):
        r0.url, r1.url = u0, u1
        yield [r0, r1]


def _write(
    path: Path,
    replicas: list[ScriptedReplica],
    settings: dict[str, dict[str, int]] | None = None,
    **sections: Any,
) -> Path:
    """The gateway's file: ``replicas`` (with ``settings`` by replica id), five adapters."""
    entries = []
    for rep in replicas:
        entry: dict[str, Any] = {"id": rep.name, "url": rep.url}
        if settings and rep.name in settings:
            entry["settings"] = settings[rep.name]
        entries.append(entry)
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": entries,
        "adapters": [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(5)],
        "routing": "round_robin",
        "poller": {"interval_s": 3600},  # polls happen when the test (or a reload) says
        "admin": {"token": TOKEN},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _series(text: str, *types: str) -> dict[Series, float]:
    """Every sample of the families of ``types`` (e.g. counter, histogram, gauge), by name and
    labels, parsed by prometheus_client's own parser (``_created`` samples left out)."""
    out: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in types:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(text: str, name: str, **labels: str) -> float | None:
    """``name{labels}`` (exactly those labels), None if there is no such sample."""
    return _series(text, "counter", "gauge", "histogram").get((name, tuple(sorted(labels.items()))))


def _assert_monotonic(before: str, after: str) -> None:
    """Every counter and histogram sample of ``before`` is in ``after``, not smaller."""
    old, new = _series(before, "counter", "histogram"), _series(after, "counter", "histogram")
    assert any(name.startswith("loragate_") for name, _ in old)
    missing = sorted(key for key in old if key not in new)
    assert not missing, f"series gone after the reload: {missing}"
    backwards = {key: (old[key], new[key]) for key in old if new[key] < old[key]}
    assert not backwards, f"counters that went backwards (before, after): {backwards}"


async def _reload(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(url + "/admin/reload", headers=AUTH) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def test_counters_survive_reloads_that_keep_replace_remove_and_add_replicas(
    tmp_path: Path,
) -> None:
    picky = PickyReplica("r1")
    picky.refuse = {"lora-3"}  # refusals and retries to count too
    async with _two(picky) as replicas:
        path = _write(tmp_path / "gw.yaml", replicas)
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            for model in ("lora-0", "lora-1", "lora-2", "lora-3"):
                for _ in range(2):
                    await client.completions.create(model=model, prompt="p", max_tokens=1)
            stream = await client.completions.create(model="lora-0", prompt="s", stream=True)
            async for _ in stream:
                pass
            start = await _scrape(gw.url)
            loads = {rid: _value(start, LOADS, replica=rid) for rid in ("r0", "r1")}
            assert loads["r0"] is not None and loads["r1"] is not None
            assert loads["r0"] >= 2 and loads["r1"] >= 2, loads
            assert _value(start, "loragate_adapter_load_refusals_total",
                          adapter="lora-3", replica="r1") == 1  # fmt: skip
            assert _value(start, "loragate_upstream_retries_total",
                          replica="r1", reason="refused_load") == 1  # fmt: skip
            reloads = {
                result: _value(start, "loragate_config_reloads_total", result=result)
                for result in ("ok", "rejected", "error")
            }
            assert reloads == {"ok": 0, "rejected": 0, "error": 0}  # from 0, so increase() works

            # 1. The same file again: nothing replaced, nothing moves.
            body = await _reload(http, gw.url)
            assert body["replicas_changed"] == []
            same = await _scrape(gw.url)
            _assert_monotonic(start, same)
            assert {rid: _value(same, LOADS, replica=rid) for rid in loads} == loads

            # 2. Both replicas' settings change: both are replaced. Their counts stay.
            settings = {"max_loras": 2, "max_cpu_loras": 4}
            _write(path, replicas, {"r0": settings, "r1": settings})
            body = await _reload(http, gw.url)
            assert body["replicas_changed"] == ["r0", "r1"]
            replaced = await _scrape(gw.url)
            _assert_monotonic(same, replaced)
            assert {rid: _value(replaced, LOADS, replica=rid) for rid in loads} == loads

            # ... and count on from there: lora-4 is loaded once on each (round robin).
            for _ in range(2):
                await client.completions.create(model="lora-4", prompt="p", max_tokens=1)
            more = await _scrape(gw.url)
            _assert_monotonic(replaced, more)
            for rid, n in loads.items():
                assert _value(more, LOADS, replica=rid) == n + 1, rid

            # 3. r1 removed: its counters keep their last value, its gauges go.
            _write(path, replicas[:1], {"r0": settings})
            body = await _reload(http, gw.url)
            assert body["replicas_removed"] == ["r1"]
            removed = await _scrape(gw.url)
            _assert_monotonic(more, removed)
            assert _value(removed, LOADS, replica="r1") == loads["r1"] + 1
            assert _value(removed, "loragate_replica_healthy", replica="r1") is None
            assert _value(removed, IN_FLIGHT, replica="r1") is None
            assert _value(removed, "loragate_replica_healthy", replica="r0") == 1

            # 4. r1 back (another URL would do too): it counts on from its last value.
            _write(path, replicas)
            body = await _reload(http, gw.url)
            assert body["replicas_added"] == ["r1"]
            back = await _scrape(gw.url)
            _assert_monotonic(removed, back)
            assert _value(back, LOADS, replica="r1") == loads["r1"] + 1
            assert _value(back, "loragate_replica_healthy", replica="r1") == 1
            assert _value(back, "loragate_config_reloads_total", result="ok") == 4


async def test_sighup_keeps_the_adapter_load_counts_of_replaced_replicas(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    path = _write(tmp_path / "gw.yaml", replicas[:1])
    async with serve_process(path) as serve, aiohttp.ClientSession() as http:
        for model in ("lora-0", "lora-1"):
            body = {"model": model, "prompt": "p", "max_tokens": 1}
            async with http.post(serve.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
        before = await _scrape(serve.url)
        assert _value(before, LOADS, replica="r0") == 2
        _write(path, replicas[:1], {"r0": {"max_loras": 2, "max_cpu_loras": 4}})
        serve.proc.send_signal(signal.SIGHUP)
        await serve.wait_for_log(r"config reloaded: .* ~\['r0'\]")
        after = await _scrape(serve.url)
        _assert_monotonic(before, after)
        assert _value(after, LOADS, replica="r0") == 2
        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.proc.wait(), timeout=30) == 0


def _redis_state(redis: RedisServer) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis_url": redis.url,
        "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
        "refresh_s": 0.05,
        "op_timeout_s": 0.5,
        "maintenance_interval_s": 0.02,
    }


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The embedded store, or a real redis-server (the shared in-flight leases)."""
    if request.param == "memory":
        return {"backend": "memory"}
    redis: RedisServer = request.getfixturevalue("redis_server")
    return _redis_state(redis)


async def _until(url: str, name: str, value: float, **labels: str) -> str:
    """Scrape until ``name{labels}`` is ``value`` (a hang guard, not a timing check)."""
    text = ""
    for _ in range(200):
        text = await _scrape(url)
        if _value(text, name, **labels) == value:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never became {value}:\n{text}")


async def _until_gone(url: str, name: str, **labels: str) -> str:
    """Scrape until there is no ``name{labels}`` sample (a hang guard, not a timing check)."""
    text = ""
    for _ in range(200):
        text = await _scrape(url)
        if _value(text, name, **labels) is None:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never went away:\n{text}")


async def test_in_flight_gauges_across_a_replacement_with_a_stream_running(
    replicas: list[ScriptedReplica], tmp_path: Path, state: dict[str, Any]
) -> None:
    gate = asyncio.Event()
    replicas[0].stream_gate = gate  # r0 holds its streams after the first event
    path = _write(tmp_path / "gw.yaml", replicas[:1], state=state)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        stream = await client.completions.create(model="lora-0", prompt="hold", stream=True)
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"
        held = await _until(gw.url, SHARED_IN_FLIGHT, 1, replica="r0")
        assert _value(held, IN_FLIGHT, replica="r0") == 1

        _write(path, replicas[:1], {"r0": {"max_loras": 2, "max_cpu_loras": 4}}, state=state)
        assert (await _reload(http, gw.url))["replicas_changed"] == ["r0"]
        during = await _scrape(gw.url)
        assert _value(during, IN_FLIGHT, replica="r0") == 1  # still running: still counted
        assert _value(during, SHARED_IN_FLIGHT, replica="r0") == 1
        _assert_monotonic(held, during)

        gate.set()
        assert [c.choices[0].text async for c in it] == [" two", " three"]
        done = await _until(gw.url, SHARED_IN_FLIGHT, 0, replica="r0")
        assert _value(done, IN_FLIGHT, replica="r0") == 0
        # A request on the replacement counts up and back down to 0, not below.
        await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        after = await _until(gw.url, SHARED_IN_FLIGHT, 0, replica="r0")
        assert _value(after, IN_FLIGHT, replica="r0") == 0
        assert _value(after, "loragate_requests_total",
                      adapter="lora-0", replica="r0", status="200") == 2  # fmt: skip
        assert gw.gateway.inflight.adapter_counts("r0") == {}
        _assert_monotonic(during, after)


async def test_a_request_waiting_for_an_adapter_load_survives_a_replacement(
    tmp_path: Path,
) -> None:
    async with _two(ScriptedReplica("r1")) as replicas:
        gated = replicas[0]
        assert isinstance(gated, GatedReplica)
        gated.load_gate = asyncio.Event()
        path = _write(tmp_path / "gw.yaml", replicas[:1])
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            waiting = asyncio.create_task(
                client.completions.with_raw_response.create(
                    model="lora-1", prompt="p", max_tokens=1
                )
            )
            await wait_until(lambda: gated.loads_started == 1, "the load of lora-1 on r0")
            before = await _scrape(gw.url)
            assert _value(before, IN_FLIGHT, replica="r0") == 1
            # r0's settings change (it is replaced) while the request waits for its load.
            _write(path, replicas[:1], {"r0": {"max_loras": 2, "max_cpu_loras": 4}})
            assert (await _reload(http, gw.url))["replicas_changed"] == ["r0"]
            # The same URL: the same vLLM server. A request for lora-1 on the replacement
            # waits for that load, it does not start another.
            joining = asyncio.create_task(
                client.completions.with_raw_response.create(
                    model="lora-1", prompt="q", max_tokens=1
                )
            )
            await _until(gw.url, IN_FLIGHT, 2, replica="r0")
            gated.load_gate.set()
            for raw in (await waiting, await joining):
                assert raw.http_response.status_code == 200
                assert raw.headers["x-loragate-replica"] == "r0"
            assert gated.loads_started == 1
            after = await _scrape(gw.url)
            _assert_monotonic(before, after)
            assert _value(after, LOADS, replica="r0") == 1  # the load that got through
            assert _value(after, IN_FLIGHT, replica="r0") == 0
            requests = {
                status: _value(after, "loragate_requests_total",
                               adapter="lora-1", replica="r0", status=status)
                for status in ("200", "client_closed", "502")
            }  # fmt: skip
            assert requests == {"200": 2, "client_closed": None, "502": None}
            # The replacement polled r0 before that load ended, and learnt of it when it
            # ended: its next request for lora-1 goes straight there, without asking again.
            assert gw.gateway.pool.is_registered("r0", "lora-1")
            raw = await client.completions.with_raw_response.create(
                model="lora-1", prompt="p", max_tokens=1
            )
            assert raw.http_response.status_code == 200
            assert gated.loads_started == 1
            # An adapter loaded on r0 behind the gateway's back (by hand): the gateway's load
            # is answered "already loaded", which is success, no load, and registered.
            load = {"lora_name": "lora-2", "lora_path": "/loras/lora-2"}
            async with http.post(gated.url + "/v1/load_lora_adapter", json=load) as resp:
                assert resp.status == 200
            for _ in range(2):
                raw = await client.completions.with_raw_response.create(
                    model="lora-2", prompt="p", max_tokens=1
                )
                assert raw.http_response.status_code == 200
                assert gw.gateway.pool.is_registered("r0", "lora-2")
            assert gated.loads_started == 3  # by hand, then the gateway's once
            again = await _scrape(gw.url)
            assert _value(again, LOADS, replica="r0") == 1


async def test_the_connection_of_a_replaced_replica_closes_when_its_request_ends(
    tmp_path: Path,
) -> None:
    async with _two(RecordingReplica("r1")) as replicas:
        first, second = replicas  # r0 (replaced below) and r1 (a recording replica)
        second.answer_gate = asyncio.Event()
        path = _write(tmp_path / "gw.yaml", [second])
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            held = asyncio.create_task(client.completions.create(model=BASE, prompt="p"))
            await wait_until(lambda: second.transports, "the request to reach r1")
            _write(path, [second], {"r1": {"max_loras": 2, "max_cpu_loras": 4}})
            assert (await _reload(http, gw.url))["replicas_changed"] == ["r1"]
            second.answer_gate.set()
            assert (await held).choices[0].text == "hi from r1"
            [old] = second.transports
            # The replaced entry's keep-alive connection is closed, not left idle for good.
            await wait_until(old.is_closing, "the replaced replica's connection to close")
            after = await _scrape(gw.url)
            assert _value(after, IN_FLIGHT, replica="r1") == 0
            await client.completions.create(model=BASE, prompt="p")
            assert len(second.transports) == 2 and second.transports[1] is not old
        assert first.requests == []


async def test_a_removed_replica_with_a_stream_running_leaks_no_in_flight_request(
    replicas: list[ScriptedReplica], tmp_path: Path, state: dict[str, Any]
) -> None:
    first, second = replicas
    gate = asyncio.Event()
    second.stream_gate = gate  # r1 holds its streams after the first event
    path = _write(tmp_path / "gw.yaml", [second], state=state)
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        stream = await client.completions.create(model=BASE, prompt="hold", stream=True)
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"
        held = await _until(gw.url, SHARED_IN_FLIGHT, 1, replica="r1")
        _write(path, [first], state=state)  # r1 out, r0 in, while r1's stream runs
        body = await _reload(http, gw.url)
        assert (body["replicas_added"], body["replicas_removed"]) == (["r0"], ["r1"])
        # Out of the pool, but its stream still runs: still counted in flight, in both.
        removed = await _scrape(gw.url)
        assert _value(removed, IN_FLIGHT, replica="r1") == 1
        assert _value(removed, SHARED_IN_FLIGHT, replica="r1") == 1
        assert _value(removed, IN_FLIGHT, replica="r0") == 0
        assert _value(removed, "loragate_replica_healthy", replica="r1") is None
        gate.set()
        assert [c.choices[0].text async for c in it] == [" two", " three"]
        # Its last request ended: its gauges go, as a removed replica's do.
        gone = await _until_gone(gw.url, IN_FLIGHT, replica="r1")
        assert _value(gone, SHARED_IN_FLIGHT, replica="r1") is None
        _write(path, [first, second], state=state)  # r1 back: nothing of it is in flight
        assert (await _reload(http, gw.url))["replicas_added"] == ["r1"]
        back = await _until(gw.url, SHARED_IN_FLIGHT, 0, replica="r1")
        assert _value(back, IN_FLIGHT, replica="r1") == 0
        assert _value(back, "loragate_requests_total",
                      adapter="", replica="r1", status="200") == 1  # fmt: skip
        _assert_monotonic(held, back)
