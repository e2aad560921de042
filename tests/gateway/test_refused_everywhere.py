"""An adapter that every healthy replica refused lately (e.g. a config adapter whose path does
not exist) is answered at once from the remembered refusals: a 502 naming every replica and
its reason, no load call, one WARNING per (adapter, replica) per ``adapter_refusal_ttl_s``;
once a refusal lapses, one load tries again (single flight), so a fixed replica recovers.
Over loopback with scripted replicas that refuse as vLLM does and the openai SDK."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import openai
import pytest
from gateway_harness import PickyReplica, gateway_config, openai_client, picky_replicas

from loragate.core.clock import VirtualClock
from loragate.gateway import running_gateway

TTL_S = 60.0
POOL_LOG = "loragate.backends.pool"


@pytest.fixture
async def picky() -> AsyncIterator[list[PickyReplica]]:
    async with picky_replicas() as replicas:
        yield replicas


async def _refused(client: openai.AsyncOpenAI) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
    return info.value


async def _outcomes(client: openai.AsyncOpenAI, n: int) -> list[str]:
    """``n`` requests for lora-0 at once: each one's text, or its status code."""

    async def one() -> str:
        try:
            done = await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        return done.choices[0].text

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _load_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == POOL_LOG
        and r.levelno == logging.WARNING
        and "failed to load" in r.getMessage()
    ]


async def test_refused_everywhere_is_answered_from_memory(
    picky: list[PickyReplica], caplog: pytest.LogCaptureFixture
) -> None:
    for rep in picky:
        rep.refuse = {"lora-0"}
    clock = VirtualClock(1000.0)
    cfg = gateway_config([r.url for r in picky], routing="round_robin")
    caplog.set_level(logging.WARNING, logger=POOL_LOG)
    async with running_gateway(cfg, port=0, clock=clock) as gw, openai_client(gw.url) as client:
        first = await _refused(client)
        assert first.status_code == 502
        assert [r.refused for r in picky] == [1, 1]  # r0, then the retry on r1
        # Every later request: answered from the refusals, no load call anywhere.
        for _ in range(5):
            exc = await _refused(client)
            assert exc.status_code == 502
            assert isinstance(exc.body, dict)
            assert exc.body["code"] == "adapter_load_failed"
            assert exc.body["type"] == "upstream_error"
            message = exc.body["message"]
            assert "replica r0: " in message and "replica r1: " in message
            assert message.count("max_lora_rank 8") == 2  # each replica's own reason
            assert "X-Loragate-Replica" not in exc.response.headers
        assert await _outcomes(client, 20) == ["502"] * 20
        assert [r.refused for r in picky] == [1, 1]
        assert [r.load_calls for r in picky] == [1, 1]
        # One WARNING per (adapter, replica), worded for what is true when it is logged.
        warnings = _load_warnings(caplog)
        assert len(warnings) == 2, warnings
        assert "while another replica can take them" in warnings[0]
        assert "unless no other replica" not in warnings[1]
        assert "every healthy replica refused it" in warnings[1]

        # The refusals lapse: one load per replica tries again, however many requests come.
        clock.advance_by(TTL_S)
        assert await _outcomes(client, 12) == ["502"] * 12
        assert [r.refused for r in picky] == [2, 2]
        assert len(_load_warnings(caplog)) == 4

        # r1 fixed: once its refusal lapses, the next requests load it there and are served.
        picky[1].refuse.clear()
        assert await _outcomes(client, 4) == ["502"] * 4  # still remembered
        clock.advance_by(TTL_S)
        assert await _outcomes(client, 12) == ["hi from r1"] * 12
        assert [r.refused for r in picky] == [3, 2]
        assert picky[1].load_calls == 3 and "lora-0" in picky[1].adapters


async def test_without_memory_the_502_names_both_replicas(picky: list[PickyReplica]) -> None:
    # adapter_refusal_ttl_s 0: every request tries again, and its 502 names both refusals.
    for rep in picky:
        rep.refuse = {"lora-0"}
    cfg = gateway_config(
        [r.url for r in picky],
        routing="round_robin",
        poller={"interval_s": 3600, "adapter_refusal_ttl_s": 0},
    )
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        for n in (1, 2):
            exc = await _refused(client)
            assert exc.status_code == 502
            assert isinstance(exc.body, dict)
            assert exc.body["code"] == "adapter_load_failed"
            assert "replica r0: " in exc.body["message"]
            assert "replica r1: " in exc.body["message"]
            assert [r.refused for r in picky] == [n, n]
