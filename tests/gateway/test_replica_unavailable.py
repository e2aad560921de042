"""A replica that is stopping answers a new request with a 503 (the simulated replica: "The
replica is shutting down."; vLLM's drain middleware: ``{"error": "Server is unavailable.
Please try again later."}``): the request did not run there, so the gateway sends it to
another replica, as it does a request the replica aborted (``engine_stopped`` in
loragate_upstream_retries_total, the request's one retry; the replica out of rotation until a
poll succeeds). Before, the 503 reached the client although another replica could run it:
test_chaos_accounting.py saw it when a request reached r1 during its SIGTERM shutdown."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from metric_counts import counts

from loragate.gateway import running_gateway
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

_DRAINING = json.dumps({"error": "Server is unavailable. Please try again later."}).encode()
_VLLM_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_DRAINING), _DRAINING)
)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_a_stopping_replica_refuses_is_answered_by_another(stream: bool) -> None:
    stopping = ReplicaConfig(served_model_name=BASE, profile="fast")
    other = ReplicaConfig(served_model_name=BASE, profile="fast", seed=1)
    async with run_replica(stopping, port=0) as r0, run_replica(other, port=0) as r1:
        cfg = gateway_config([r0.url, r1.url], routing="round_robin")
        async with (
            running_gateway(cfg, port=0) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            await r0.state.stop_engine()  # its shutdown: new requests get its 503
            raw = await client.completions.with_raw_response.create(  # round robin: r0
                model=BASE, prompt="p", max_tokens=3, stream=stream
            )
            answer = raw.parse()
            chunks = [c async for c in answer] if stream else [answer]
            requests = await counts(http, gw.url, "loragate_requests_total")
            retries = await counts(http, gw.url, "loragate_upstream_retries_total")
    assert raw.headers["X-Loragate-Replica"] == "r1"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert requests == {("r1", "200"): 1}  # once, under the replica that answered
    assert retries == {("r0", "engine_stopped"): 1}


async def test_vllms_503_while_it_drains_is_retried_too(
    replicas: list[ScriptedReplica],
) -> None:
    draining, other = replicas
    draining.raw_answer = _VLLM_503
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with (
        running_gateway(cfg, port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        raw = await client.completions.with_raw_response.create(
            model=BASE, prompt="p", max_tokens=3
        )
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        healthy = [s.replica_id for s in gw.gateway.pool.healthy_snapshots()]
    assert raw.headers["X-Loragate-Replica"] == "r1" and raw.parse().choices
    assert len(draining.requests) == len(other.requests) == 1
    assert retries == {("r0", "engine_stopped"): 1}
    assert healthy == ["r1"]  # out of rotation until a poll succeeds


async def test_without_another_replica_the_503_is_the_clients() -> None:
    config = ReplicaConfig(served_model_name=BASE, profile="fast")
    async with (
        run_replica(config, port=0) as r0,
        running_gateway(gateway_config([r0.url]), port=0) as gw,
        openai_client(gw.url) as client,
    ):
        await r0.state.stop_engine()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.completions.create(model=BASE, prompt="p", max_tokens=3)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["X-Loragate-Replica"] == "r0"
