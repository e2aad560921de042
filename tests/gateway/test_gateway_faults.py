"""Faults: upstreams that hang, refuse, drop the connection or die mid-stream; the gateway
answers in the OpenAI error shape with the right status and keeps serving."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client, wait_until

from loragate.gateway import running_gateway
from ports import unused_port


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{unused_port()}"  # nothing listens there


async def _error(resp: aiohttp.ClientResponse) -> dict[str, object]:
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_timeout_is_504(replicas: list[ScriptedReplica], stream: bool) -> None:
    replicas[0].mode = "hang"
    cfg = gateway_config(
        [replicas[0].url], limits={"request_timeout_s": 0.3, "stream_read_timeout_s": 0.3}
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        body = {"model": BASE, "prompt": "p", "stream": stream}
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 504
            assert (await _error(resp))["code"] == "upstream_timeout"
        replicas[0].mode = "ok"
        async with http.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200  # a timeout does not take the replica out
            await resp.read()


async def test_dropped_request_is_retried_once_on_another_replica(
    replicas: list[ScriptedReplica],
) -> None:
    replicas[0].mode = "drop"
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        for _ in range(4):
            done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        assert not gw.gateway.pool.is_healthy("r0")  # taken out after the first drop
        assert len(replicas[0].requests) == 1  # ...so it saw exactly one request
        # A successful poll brings it back.
        replicas[0].mode = "ok"
        await gw.gateway.pool.poll_once()
        assert gw.gateway.pool.is_healthy("r0")


async def test_a_replica_serving_another_model_is_skipped(
    replicas: list[ScriptedReplica],
) -> None:
    # A replica started without --served-model-name would answer every base-model request
    # with vLLM's 404 "The model ... does not exist": it must get no traffic.
    replicas[1].base_model = "loragate/sim-base"
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        for model in (BASE, "lora-1", BASE, "lora-2"):
            done = await client.completions.create(model=model, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r0"
        assert replicas[1].requests == [] and replicas[1].load_calls == 0
        replicas[1].base_model = BASE  # restarted with the right name: back after one poll
        await gw.gateway.pool.poll_once()
        for _ in range(2):
            await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert len(replicas[1].requests) == 1


async def test_when_every_replica_drops_the_client_gets_502(
    replicas: list[ScriptedReplica],
) -> None:
    for r in replicas:
        r.mode = "drop"
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 502
            assert (await _error(resp))["type"] == "upstream_error"
        assert sum(len(r.requests) for r in replicas) == 2  # one try, one retry
        # Both are out of rotation now: 503 until a poll succeeds.
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 503
            assert (await _error(resp))["code"] == "no_replica_available"


async def test_refusing_replica_is_skipped(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([_closed_port_url(), replicas[0].url], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        assert not gw.gateway.pool.is_healthy("r0")  # the first poll found it down
        for _ in range(3):
            done = await client.completions.create(model="lora-1", prompt="p", max_tokens=1)
            assert done.model == "lora-1"
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "degraded"


async def test_no_healthy_replica_is_503() -> None:
    cfg = gateway_config([_closed_port_url()])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp:
            assert resp.status == 503
            await _error(resp)
        async with http.get(gw.url + "/health") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "unavailable"


async def test_stream_dying_midway_ends_with_an_error_event(
    replicas: list[ScriptedReplica],
) -> None:
    replicas[0].mode = "die_mid_stream"
    cfg = gateway_config([replicas[0].url, replicas[1].url], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        stream = await client.completions.create(model=BASE, prompt="p", stream=True)
        got = []
        with pytest.raises(openai.APIError, match=r"^replica r0 broke off the stream: "):
            async for chunk in stream:
                got.append(chunk.choices[0].text)
        assert got == [" one", " two"]  # what arrived before the replica died was relayed
        # The gateway keeps serving (on the surviving replica).
        done = await client.completions.create(model=BASE, prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r1"
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        assert 'loragate_requests_total{adapter="",replica="r0",status="stream_error"} 1.0' in text


async def test_replica_killed_mid_run(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:

        async def one(i: int) -> str:
            done = await client.completions.create(model=f"lora-{i % 2}", prompt="p", max_tokens=1)
            return done.choices[0].text

        first = await asyncio.gather(*(one(i) for i in range(10)))
        assert {"hi from r0", "hi from r1"} == set(first)
        await replicas[1].runner.cleanup()
        after = await asyncio.gather(*(one(i) for i in range(20)))
        assert set(after) == {"hi from r0"}  # every request still answered
        assert [s.replica_id for s in gw.gateway.pool.healthy_snapshots()] == ["r0"]
        await gw.gateway.pool.poll_once()  # polling agrees: still out
        assert not gw.gateway.pool.is_healthy("r1")


async def test_metrics_and_health_endpoints(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        async for _ in await client.completions.create(model="lora-0", prompt="p", stream=True):
            pass
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="p")
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            async with http.get(gw.url + "/health") as resp:
                health = await resp.json()
    assert health == {
        "status": "ok",
        "replicas_healthy": 2,
        "replicas_total": 2,
        "replicas_draining": 0,
        "state": {"backend": "memory", "degraded": False, "synced": True},
    }
    counted = [line for line in text.splitlines() if line.startswith("loragate_requests_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 3
    assert any('adapter="lora-0"' in line and 'status="200"' in line for line in counted)
    assert 'loragate_requests_total{adapter="",replica="",status="404"} 1.0' in text
    assert "loragate_upstream_latency_seconds_count" in text
    assert "loragate_ttft_seconds_count" in text
    assert 'loragate_in_flight_requests{replica="r0"} 0.0' in text
    assert 'loragate_replica_healthy{replica="r1"} 1.0' in text
    assert "loragate_adapter_loads_total" in text


async def test_client_going_away_aborts_the_upstream_request(
    replicas: list[ScriptedReplica],
) -> None:
    replicas[0].mode = "hang"
    gate = asyncio.Event()
    replicas[1].stream_gate = gate  # r1 holds its stream after the first event
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw:
        inflight = gw.gateway.inflight
        # Non-streaming, on r0 (hangs): the client gives up after 0.3 s.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
            with pytest.raises(TimeoutError):
                async with http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as r:
                    await r.read()
        await wait_until(lambda: replicas[0].cancelled == 1, "r0 to see the abort")
        # Streaming, on r1: the client reads the first event, then disconnects.
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "p", "stream": True}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert (await resp.content.readline()).startswith(b"data: ")
        await wait_until(lambda: replicas[1].cancelled == 1, "r1 to see the abort")
        await wait_until(lambda: inflight.counts() == {"r0": 0, "r1": 0}, "in-flight to drain")
        assert gw.gateway.pool.is_healthy("r0") and gw.gateway.pool.is_healthy("r1")
