"""Requests the gateway refuses before routing (its own 400s, unknown models) are counted and
logged with the model they named: under a known adapter's label in loragate_requests_total
(before, adapter="" and model=<base> in the access log); an unknown name keeps the label ""
(the label's values stay bounded) and is logged as asked, quoted and cut short, never as
<base>. In-process gateway over loopback, the openai SDK as client."""

from __future__ import annotations

import logging
import re

import aiohttp
import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client
from log_lines import PROXY_LOG, access_lines

from loragate.gateway import running_gateway


def _requests_total(text: str) -> dict[tuple[str, str, str], int]:
    """loragate_requests_total by (adapter, replica, status)."""
    return {
        (a, r, s): int(float(n))
        for a, r, s, n in re.findall(
            r'^loragate_requests_total\{adapter="([^"]*)",replica="([^"]*)",status="([^"]*)"\} '
            r"(\S+)$",
            text,
            re.M,
        )
        if float(n)
    }


async def test_refusals_before_routing_name_the_model_asked(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=PROXY_LOG)
    long_name = "x" * 100 + "\nrequest 9 forged"
    async with (
        running_gateway(gateway_config([r.url for r in replicas]), port=0) as gw,
        openai_client(gw.url) as client,
        aiohttp.ClientSession() as http,
    ):
        with pytest.raises(openai.BadRequestError):  # max_tokens 0: the gateway's own 400
            await client.completions.create(model="lora-1", prompt="p", max_tokens=0)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=BASE, prompt="p", max_tokens=0)
        for name in ("no-such-adapter", long_name):
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model=name, prompt="p", max_tokens=1)
        async with http.post(gw.url + "/v1/completions", data=b"not json") as resp:
            assert resp.status == 400
        async with http.get(gw.url + "/metrics") as resp:
            counted = _requests_total(await resp.text())
    assert counted == {("lora-1", "", "400"): 1, ("", "", "400"): 2, ("", "", "404"): 2}
    models = [re.search(r" model=(.*) replica=", line) for line in access_lines(caplog)]
    assert [m.group(1) if m else None for m in models] == [
        "lora-1",
        "<base>",
        "'no-such-adapter'",
        repr("x" * 64) + "...",
        "-",
    ]
    assert not [r for rep in replicas for r in rep.requests]
