"""What the gateway tells a retrying client: a 504 ``upstream_timeout`` says
``x-should-retry: false`` (the OpenAI SDKs would send the request again twice, each running as
long on a replica), a 503 ``no_replica_available`` says ``Retry-After`` (loopback, the openai
SDK with its default retries)."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway


@pytest.mark.parametrize("stream", [False, True])
async def test_the_sdk_does_not_repeat_a_request_that_timed_out_upstream(
    replicas: list[ScriptedReplica], stream: bool
) -> None:
    for r in replicas:
        r.mode = "hang"
    cfg = gateway_config(
        [r.url for r in replicas], limits={"request_timeout_s": 0.3, "stream_read_timeout_s": 0.3}
    )
    async with (
        running_gateway(cfg, port=0) as gw,
        openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="none", max_retries=2, timeout=30.0
        ) as client,
    ):
        with pytest.raises(openai.InternalServerError) as info:
            await client.completions.create(
                model=cfg.base_model,
                prompt="slow",
                max_tokens=1,
                stream=stream,
            )
    assert info.value.status_code == 504
    assert info.value.response.headers["x-should-retry"] == "false"
    assert sum(len(r.requests) for r in replicas) == 1  # sent once, not three times


async def test_no_replica_available_says_when_to_retry(replicas: list[ScriptedReplica]) -> None:
    for r in replicas:
        await r.runner.cleanup()  # both down
    cfg = gateway_config([r.url for r in replicas])
    async with (
        running_gateway(cfg, port=0) as gw,
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/completions", json={"prompt": "p"}) as resp,
    ):
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "no_replica_available"
        assert resp.headers["Retry-After"] == "1"
        assert "x-should-retry" not in resp.headers
