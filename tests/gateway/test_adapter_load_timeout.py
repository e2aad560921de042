"""A request whose adapter load does not finish in time on its replica (a hung replica: it
takes the load request and never answers) waits no longer than ``limits.request_timeout_s``
for it, and is retried once on another replica, as a load that could not connect is (counted
``load_failed`` in loragate_upstream_retries_total). It waited ``limits.admin_timeout_s``
(60 s by default) and got a 504, not retried, while another replica was healthy (found by a
walk-through: a SIGSTOPped replica, 504 after 60.5 s). Without another replica the client
gets the 504 at its request_timeout_s, and the load goes on for the replica's sake; the 504
carries no ``x-should-retry: false`` (the replica never got the request, so a retry is safe)."""

from __future__ import annotations

import aiohttp
from gateway_harness import ScriptedReplica, gateway_config
from metric_counts import counts

from loragate.gateway import running_gateway

_REQUEST = {"model": "lora-0", "prompt": "p", "max_tokens": 4}
# The request gives up on the load long before the load's own timeout: a test that passes
# waited request_timeout_s, not admin_timeout_s (5 s: the test fails within it if it waits).
_LIMITS = {"request_timeout_s": 0.3, "admin_timeout_s": 5.0}


async def test_a_load_that_does_not_finish_in_time_is_retried_on_another_replica(
    replicas: list[ScriptedReplica],
) -> None:
    hung, healthy = replicas
    hung.load_delay_s = 3600.0  # takes the load request and never answers
    cfg = gateway_config([r.url for r in replicas], routing="round_robin", limits=_LIMITS)
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json=_REQUEST) as resp:
            status, replica = resp.status, resp.headers["X-Loragate-Replica"]
            answer = await resp.json()
        requests = await counts(http, gw.url, "loragate_requests_total")
        retries = await counts(http, gw.url, "loragate_upstream_retries_total")
        assert gw.gateway.pool.loading("r0") == {"lora-0"}  # the load goes on there
        assert gw.gateway.pool.is_healthy("r0")  # slow is not dead: the poller decides
    assert (status, replica) == (200, "r1"), answer
    assert answer["choices"][0]["text"] == "hi from r1"
    assert hung.load_calls == 1 and healthy.load_calls == 1
    assert requests == {("r1", "200"): 1}
    assert retries == {("r0", "load_failed"): 1}


async def test_without_another_replica_the_client_gets_a_504_at_its_request_timeout(
    replicas: list[ScriptedReplica],
) -> None:
    hung = replicas[0]
    hung.load_delay_s = 3600.0
    cfg = gateway_config([hung.url], limits=_LIMITS)
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/completions", json=_REQUEST) as resp:
            status, replica = resp.status, resp.headers["X-Loragate-Replica"]
            retry_hint = resp.headers.get("x-should-retry")
            error = (await resp.json())["error"]
        requests = await counts(http, gw.url, "loragate_requests_total")
        assert gw.gateway.pool.loading("r0") == {"lora-0"}
    assert (status, replica) == (504, "r0")
    assert error["code"] == "upstream_timeout"
    assert error["message"] == "replica r0: loading adapter 'lora-0' did not finish in time"
    assert requests == {("r0", "504"): 1}
    # The replica never got the request: the SDKs may retry it (before: "false").
    assert retry_hint is None
