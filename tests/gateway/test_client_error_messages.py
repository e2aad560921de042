"""What a client reads when a replica fails: the replica named by its id, never by its URL
(that stays in the log and the admin API), over loopback with scripted replicas."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import aiohttp
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _internal(replicas: list[ScriptedReplica]) -> list[str]:
    """What must not reach a client: each replica's URL, host:port and port."""
    out = []
    for rep in replicas:
        parts = urlsplit(rep.url)
        out += [rep.url, parts.netloc, str(parts.port)]
    return out


async def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        return resp.status, (await resp.json())["error"]


async def test_a_refused_adapter_load_names_the_replica(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    # Neither replica can read the folder: vLLM's 404 on /v1/load_lora_adapter, twice.
    cfg = gateway_config(
        [r.url for r in replicas], adapters=[{"name": "far", "path": "/elsewhere/far"}]
    )
    with caplog.at_level(logging.WARNING, logger="loragate.backends.pool"):
        async with running_gateway(cfg, port=0) as gw:
            status, err = await _post(
                gw.url + "/v1/completions", {"model": "far", "prompt": "p", "max_tokens": 1}
            )
    assert status == 502 and err["code"] == "adapter_load_failed"
    message = err["message"]
    assert "replica r0: " in message and "replica r1: " in message, message  # both refused
    assert "loading adapter 'far' failed (404): Loading lora far failed: No adapter found" in (
        message
    )
    assert not [s for s in _internal(replicas) if s in message], message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(rep.url in logged for rep in replicas)  # the operator gets the URLs


@pytest.mark.parametrize(
    ("model", "said"),
    [
        (BASE, "replica r1: cannot connect: Connection refused"),
        ("lora-0", "replica r1: could not be reached to load adapter 'lora-0'"),
    ],
)
async def test_an_unreachable_replica_is_named_by_its_id(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture, model: str, said: str
) -> None:
    cfg = gateway_config([r.url for r in replicas], routing="round_robin", admin={"token": TOKEN})
    with caplog.at_level(logging.WARNING, logger="loragate.gateway.proxy"):
        async with running_gateway(cfg, port=0) as gw:
            for rep in replicas:  # both die after the first poll found them healthy
                await rep.runner.cleanup()
            status, err = await _post(
                gw.url + "/v1/completions", {"model": model, "prompt": "p", "max_tokens": 1}
            )
            async with (
                aiohttp.ClientSession() as http,
                http.get(gw.url + "/admin/replicas", headers=AUTH) as resp,
            ):
                listed = {r["id"]: r for r in (await resp.json())["replicas"]}
    assert status == 502 and err["code"] == "upstream_unavailable"
    assert err["message"] == said  # r0 first, then the one retry on r1
    # The admin API and the log name the URLs.
    for i, rep in enumerate(replicas):
        assert rep.url in listed[f"r{i}"]["last_error"], listed[f"r{i}"]["last_error"]
        assert any(rep.url in r.getMessage() for r in caplog.records)


async def test_a_timeout_names_the_replica(replicas: list[ScriptedReplica]) -> None:
    replicas[0].mode = "hang"
    cfg = gateway_config([replicas[0].url], limits={"request_timeout_s": 0.3})
    async with running_gateway(cfg, port=0) as gw:
        status, err = await _post(gw.url + "/v1/completions", {"prompt": "p", "max_tokens": 1})
    assert status == 504 and err["message"] == "replica r0: did not answer in time"


async def test_an_adapter_load_timeout_names_the_replica(replicas: list[ScriptedReplica]) -> None:
    replicas[0].load_delay_s = 5.0
    cfg = gateway_config([replicas[0].url], limits={"admin_timeout_s": 0.3})
    async with running_gateway(cfg, port=0) as gw:
        status, err = await _post(
            gw.url + "/v1/completions", {"model": "lora-0", "prompt": "p", "max_tokens": 1}
        )
    assert status == 504
    assert err["message"] == "replica r0: loading adapter 'lora-0' did not finish in time"


async def test_failed_requests_are_counted_with_the_replica_that_failed_them(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config(
        [r.url for r in replicas],
        routing="round_robin",
        adapters=[{"name": "far", "path": "/elsewhere/far"}],
        limits={"request_timeout_s": 0.3},
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        # Refused by r0, then by r1 on the retry: the 502 is r1's.
        status, _ = await _post(gw.url + "/v1/completions", {"model": "far", "prompt": "p"})
        assert status == 502
        replicas[0].mode = replicas[1].mode = "hang"
        status, _ = await _post(gw.url + "/v1/completions", {"prompt": "p"})
        assert status == 504
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    counted = sorted(line for line in text.splitlines() if line.startswith("loragate_requests_"))
    assert counted == [
        'loragate_requests_total{adapter="",replica="r0",status="504"} 1.0',
        'loragate_requests_total{adapter="far",replica="r1",status="502"} 1.0',
    ]
